"""What a training leaves for the jobs after it: committed step directories and the weights exported in
them. Training writes this layout (`stages.train`), rendering reads it (`stages.render`); both use the
names and functions here, so the writer and the reader cannot drift apart.

    train.out_dir/checkpoints/step_{step:08d}/
        COMMITTED                  written last, by rank 0, once every rank has saved: resume and render
                                   trust only step directories that have it
        config.yaml, meta.json     the run config and (step, world size, ZeRO stage, precision)
        ds/, rank_{r:05d}.pt       DeepSpeed's shards and each rank's state (`stages.train.checkpoint`)
        exported/                  safetensors for inference, loadable without DeepSpeed:
            config.yaml                the model config (`VideoDiT.from_pretrained`)
            {state}.safetensors        the DiT weights of each state: `model` (the optimizer's) and `ema`
            text_config.yaml           the byte text encoder's config (`ByteTextEncoder.from_pretrained`)
            {state}_text.safetensors   its weights, when the text encoder was trained (text.encoder=byte)
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from configs import RunConfig
from models.dit import CONFIG_NAME, VideoDiT
from models.text import TEXT_CONFIG_NAME, ByteTextEncoder, T5TextEncoder
from models.weights import load_safetensors, save_weights

MARKER = "COMMITTED"
"""The commit marker of a step directory."""
EXPORTED = "exported"
"""The folder of a step directory holding the inference weights."""


# --------------------------------------------------------------------------------------------------
# Step directories
# --------------------------------------------------------------------------------------------------


def checkpoint_root(out_dir: str | Path) -> Path:
    """`out_dir/checkpoints`."""
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    """The step directory of `step` under a training out_dir."""
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def committed(out_dir: str | Path) -> list[Path]:
    """Committed step directories of a training out_dir, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if (d / MARKER).is_file())


def resolve_committed(path: str | Path, what: str = "checkpoint") -> Path:
    """A committed step directory from `path`: that directory itself, or the newest committed checkpoint
    of a training out_dir. FileNotFoundError naming `what` and the path when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} does not exist (train the model first, or fix the path)")
    found = committed(path)
    if not found:
        partial = (
            f" (a step directory without its {MARKER} marker: a partial save?)"
            if path.name.startswith("step_")
            else ""
        )
        raise FileNotFoundError(f"{what}: no committed checkpoint under {path}{partial}")
    return found[-1]


# --------------------------------------------------------------------------------------------------
# Exported weights
# --------------------------------------------------------------------------------------------------


def weights_name(state: str) -> str:
    """The DiT weights file of `state` in `exported/`."""
    return f"{state}.safetensors"


def text_weights_name(state: str) -> str:
    """The byte text encoder's weights file of `state` in `exported/`."""
    return f"{state}_text.safetensors"


def export_weights(directory: Path, cfg: RunConfig, states: dict[str, dict[str, Tensor]]) -> None:
    """Write `directory/exported/` from full trainer state dicts by state name (`dit.*` keys, and
    `text.*` for a trained byte text encoder), as `load_exported` reads it."""
    out = directory / EXPORTED
    for name, state in states.items():
        dit = {k.removeprefix("dit."): v for k, v in state.items() if k.startswith("dit.")}
        save_weights(out, cfg.model, dit, weights_name(name), CONFIG_NAME)
        text = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
        if text:
            save_weights(out, cfg.text, text, text_weights_name(name), TEXT_CONFIG_NAME)


def exported_files(step: Path, cfg: RunConfig, state: str = "ema") -> list[Path]:
    """The files `load_exported` needs from the step directory of a run with config `cfg`."""
    out = step / EXPORTED
    files = [out / CONFIG_NAME, out / weights_name(state)]
    if cfg.text.encoder == "byte":
        files.append(out / text_weights_name(state))
    return files


def load_exported(step: Path, cfg: RunConfig, state: str = "ema") -> tuple[VideoDiT, nn.Module]:
    """The DiT and the text encoder of a committed step directory whose run config is `cfg`: the
    exported weights of `state`, or the run's frozen T5 (read from `text.t5_path`). Safetensors only."""
    out = step / EXPORTED
    model = VideoDiT.from_pretrained(out, weights_name(state))
    if cfg.text.encoder == "t5":
        return model, T5TextEncoder.from_config(cfg.text)
    if (out / TEXT_CONFIG_NAME).is_file():
        return model, ByteTextEncoder.from_pretrained(out, text_weights_name(state))
    # an export without text_config.yaml (checkpoints of versions that did not write it): the run
    # config's text section has the same shape
    text = ByteTextEncoder.from_config(cfg.text)
    text.load_state_dict(load_safetensors(out / text_weights_name(state)))
    return model, text
