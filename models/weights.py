"""The `save_pretrained` / `from_pretrained` format of Tessera's modules: a folder with the module's
config as YAML (the typed dataclass, loadable with `configs.load_config`) and its weights as safetensors
(never a pickle). The DiT and the byte text encoder both use it; a folder may hold several weight files
(e.g. a checkpoint's `model` and `ema` states) beside one config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from configs.loader import dump_config, load_config

C = TypeVar("C")


def save_weights(
    directory: str | Path, config: Any, state: dict[str, Tensor], weights_name: str, config_name: str
) -> Path:
    """Write `config` as `directory/config_name` and `state` (moved to the CPU) as
    `directory/weights_name`; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dump_config(config, directory / config_name)
    path = directory / weights_name
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in state.items()}, path, metadata={"format": "pt"}
    )
    return path


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file at `path`; a ValueError naming it when it is not one
    (truncated, corrupt, or another format under that name)."""
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); re-export or retrain it") from err


def read_weights(
    directory: str | Path,
    schema: type[C],
    weights_name: str,
    config_name: str,
    overrides: tuple[str, ...] = (),
) -> tuple[C, dict[str, Tensor]]:
    """The config (`schema` from `directory/config_name`, with dotted overrides) and the state dict of
    `directory/weights_name`; FileNotFoundError naming the folder and the missing file."""
    directory = Path(directory)
    for name in (config_name, weights_name):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (expected a directory from save_pretrained)")
    return load_config([directory / config_name], overrides, schema=schema), load_safetensors(
        directory / weights_name
    )
