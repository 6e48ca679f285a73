"""Training previews: a few fixed prompts sampled from the EMA weights, an mp4 per prompt and a PNG
contact sheet (one row per prompt), under `train.out_dir/previews/step_XXXXXXXX/`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from configs import RunConfig
from models.dit import VideoDiT
from models.text import ByteTextEncoder
from stages.media_out import contact_sheet, write_mp4
from stages.sampling import generate, to_uint8


def write_previews(
    state: dict[str, Tensor],
    cfg: RunConfig,
    step: int,
    frozen_text: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """Sample `train.preview_prompts` on `device` from a full trainer state dict (`dit.*`, and `text.*`
    for the byte encoder; a frozen T5 is passed as `frozen_text`); returns the preview directory."""
    model = VideoDiT(cfg.model)
    model.load_weights({k.removeprefix("dit."): v for k, v in state.items() if k.startswith("dit.")})
    text = frozen_text
    if text is None:
        t = cfg.text
        text = ByteTextEncoder(dim=t.width, depth=t.depth, heads=t.heads, max_length=t.max_length)
        text.load_state_dict({k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")})
    model, text = model.to(device), text.to(device)
    d, prompts = cfg.data, list(cfg.train.preview_prompts)
    with torch.random.fork_rng():  # sampling must not move the training run's random streams
        video = generate(
            model,
            text,
            prompts,
            frames=d.frames,
            height=d.height,
            width=d.width,
            fps=d.fps,
            diffusion=cfg.diffusion,
            seed=cfg.train.seed,
            steps=cfg.train.preview_steps,
        )
    frames = to_uint8(video)
    out = Path(cfg.train.out_dir) / "previews" / f"step_{step:08d}"
    for i, clip in enumerate(frames):
        write_mp4(clip, out / f"prompt_{i:02d}.mp4", d.fps)
    contact_sheet(list(frames), out / "sheet.png", labels=prompts)
    return out
