"""Training previews sampled from the EMA weights, under `train.out_dir/previews/step_XXXXXXXX/`.

A base model samples the fixed `train.preview_prompts`: an mp4 per prompt and a PNG contact sheet (one
row per prompt). A super-resolution model upsamples held training clips instead (the run's first batch,
degraded exactly as in training; packed images are previewed one by one): an mp4 per clip
and a sheet with three rows per clip — its low-resolution input, the sample and the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from configs import RunConfig
from models.dit import VideoDiT
from models.superres import degrade
from models.text import ByteTextEncoder
from stages.media import contact_sheet, write_mp4
from stages.sampling import generate, to_uint8

if TYPE_CHECKING:  # the loader module loads webdataset: `import stages.train` stays without it
    from stages.shards.loader import Batch


def _items(batch: Batch, n: int) -> tuple[Tensor, list[str], float]:
    """The first `n` clips of a batch with their captions and frame rate; packed images are unpacked
    into single-frame clips (fps 0)."""
    x = batch.x  # (B, C, T, H, W)
    if batch.kind == "video":
        return x[:n], batch.flat_captions()[:n], float(batch.fps[0])
    frames = x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], 1, *x.shape[3:])  # (B·T, C, 1, H, W)
    return frames[:n], batch.flat_captions()[:n], 0.0


def write_previews(
    state: dict[str, Tensor],
    cfg: RunConfig,
    step: int,
    frozen_text: nn.Module | None = None,
    device: torch.device | str = "cpu",
    clips: Batch | None = None,
) -> Path:
    """Sample previews on `device` from a full trainer state dict (`dit.*`, and `text.*` for the byte
    encoder; a frozen T5 is passed as `frozen_text`); returns the preview directory. Super-resolution
    models need `clips`, a training batch at the stage's training geometry (`fit_batch`)."""
    model = VideoDiT(cfg.model)
    model.load_weights({k.removeprefix("dit."): v for k, v in state.items() if k.startswith("dit.")})
    text = frozen_text
    if text is None:
        text = ByteTextEncoder.from_config(cfg.text)
        text.load_state_dict({k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")})
    model, text = model.to(device), text.to(device)
    data = cfg.data
    n = len(cfg.train.preview_prompts)
    if cfg.model.kind == "base":
        prompts, target, cond, fps = list(cfg.train.preview_prompts), None, None, data.fps
        shape = (data.frames, data.height, data.width)
    else:
        if clips is None:
            raise ValueError(f"previews of a {cfg.model.kind} model need a batch of training clips")
        target, prompts, fps = _items(clips, n)
        shape = tuple(target.shape[2:])
        cond = degrade(target, cfg.model.kind, cfg.model.sr_factor)  # noised to the level by generate
    with torch.random.fork_rng():  # sampling must not move the training run's random streams
        video = generate(
            model,
            text,
            prompts,
            frames=shape[0],
            height=shape[1],
            width=shape[2],
            fps=fps,
            diffusion=cfg.diffusion,
            seed=cfg.train.seed,
            cond=cond,
            steps=cfg.train.preview_steps,
        )
    frames = to_uint8(video)
    out = Path(cfg.train.out_dir) / "previews" / f"step_{step:08d}"
    for i, clip in enumerate(frames):
        write_mp4(clip, out / f"prompt_{i:02d}.mp4", fps or data.fps)  # a still image: a 1-frame mp4
    if target is None:
        contact_sheet(list(frames), out / "sheet.png", labels=prompts)
    else:
        rows, labels = [], []
        for low_i, sample, want, prompt in zip(to_uint8(cond), frames, to_uint8(target), prompts):
            rows += [low_i, sample, want]
            labels += [f"input: {prompt}", "sample", "target"]
        contact_sheet(rows, out / "sheet.png", labels=labels)
    return out
