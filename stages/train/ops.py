"""DeepSpeed's compiled ops, and keeping training off their run-time (JIT) builds where it can.

DeepSpeed builds some C++ ops the first time a process needs them, through torch's
`cpp_extension.load`, in `$TORCH_EXTENSIONS_DIR/<op>/` (default `~/.cache/torch_extensions/
<py>_<accelerator>/<op>/`). Each build holds a `lock` file there, and every later process waits for that
file to go, however old it is: a build killed midway (a Ctrl-C during the first training) leaves it
behind, and from then on every training waits forever with no output.

So, on CPU:
- the optimizer is torch's own AdamW (DeepSpeed's `"torch_adam": true`; `parallelize.deepspeed_config`),
  not DeepSpeed's fused Adam, which would be built;
- DeepSpeed's shared-memory communication op is never built (`skip_shared_memory_comm`): it serves only
  DeepSpeed's inference all-reduce, and training's collectives go through torch.distributed anyway.

A checkpoint of a run that used DeepSpeed's fused Adam (CPU training before this, or CUDA) resumes
under torch's AdamW exactly: `adopt_fused_adam_steps` moves its step counts to torch's layout.

What is still built at run time (on CUDA, DeepSpeed's fused or CPU Adam; or an optimizer a user
DeepSpeed JSON asks for) waits on a lock only for a bounded time, saying which file it waits on
(`wait_for_build_locks`), and gets a `TORCH_CUDA_ARCH_LIST` that DeepSpeed's JIT builder can parse
(`deepspeed_arch_list`). `prepare_builds` does both before `deepspeed.initialize`."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

LOCK = "lock"
"""The file torch's `cpp_extension` holds in an op's build directory while it builds it."""
WARN_AFTER_S = 30.0
"""Seconds of waiting on a build lock before saying so."""
GIVE_UP_AFTER_S = 900.0
"""Seconds of waiting on a build lock before stopping (a real build takes 1-3 minutes)."""


def skip_shared_memory_comm() -> None:
    """Mark DeepSpeed's shared-memory communication op as unavailable in this process, before
    deepspeed.comm starts (`deepspeed.init_distributed` or `deepspeed.initialize`): deepspeed.comm then
    builds nothing and uses torch.distributed for every collective, which is what training's
    collectives use anyway. DeepSpeed keeps this table per process for such edits."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def adam_params(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """The params of the DeepSpeed config's optimizer when it is Adam or AdamW, the kind DeepSpeed
    compiles unless `torch_adam` is set; None for any other optimizer."""
    optimizer = ds_config.get("optimizer", {})
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return None
    return optimizer.get("params", {})


def uses_fused_adam(ds_config: dict[str, Any]) -> bool:
    """Whether this DeepSpeed config's optimizer is DeepSpeed's own Adam rather than torch's."""
    params = adam_params(ds_config)
    return params is not None and not params.get("torch_adam", False)


def adopt_fused_adam_steps(optimizer: Any) -> None:
    """After loading a fused-Adam state into torch's AdamW: give every parameter its group's step count.

    DeepSpeed's FusedAdam counts steps in one parameter's state per group and applies that count to the
    whole group (the others keep the count they started with); torch's AdamW reads each parameter's own.
    `optimizer` is DeepSpeed's (ZeRO or precision wrappers hold torch's as `.optimizer`)."""
    import torch

    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        states = [base.state[p] for p in group["params"] if "step" in base.state.get(p, {})]
        if states:
            step = max(float(state["step"]) for state in states)
            for state in states:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def prepare_builds(ds_config: dict[str, Any]) -> None:
    """Ready this process for the ops `deepspeed.initialize` with this config builds at run time: a
    parsable arch list, and no other process building them."""
    builds = run_time_builds(ds_config)
    if builds:
        deepspeed_arch_list()
    wait_for_build_locks([build_lock(op) for op in builds])


def deepspeed_arch_list() -> None:
    """Drop the arch-specific suffix from `TORCH_CUDA_ARCH_LIST` entries ('9.0a' → '9.0', saying so):
    CUDA images set Hopper's arch-specific target, which torch accepts but DeepSpeed 0.19's JIT builder
    does not (it reads each minor version as digits and fails with "invalid literal for int(): '0a'").
    Its Adam kernels use no arch-specific instructions."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[af]\b", r"\1", archs)
    if plain != archs:
        print(f"TORCH_CUDA_ARCH_LIST={archs!r} → {plain!r} for DeepSpeed's op builds", file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain


def run_time_builds(ds_config: dict[str, Any]) -> list[str]:
    """The DeepSpeed op builders (class names) that `deepspeed.initialize` with this config would build
    at run time: its Adam, unless it is torch's (`torch_adam`) or installed prebuilt with DeepSpeed."""
    if not uses_fused_adam(ds_config):
        return []
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    builder = "CPUAdamBuilder" if offload in ("cpu", "nvme") else "FusedAdamBuilder"
    return [builder] if not _prebuilt(builder) else []


def _prebuilt(builder_name: str) -> bool:
    """Whether DeepSpeed loads the op without compiling it: installed with DeepSpeed for this
    accelerator (as `OpBuilder.load` decides)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    builder = get_accelerator().create_op_builder(builder_name)
    return builder is None or (
        installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name
    )


def build_lock(builder_name: str) -> Path:
    """The lock file torch's `cpp_extension` takes while it builds this DeepSpeed op."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where `load` builds `name`

    name = get_accelerator().create_op_builder(builder_name).name
    return Path(_get_build_directory(name, verbose=False)) / LOCK


def wait_for_build_locks(
    locks: list[Path], warn_after_s: float = WARN_AFTER_S, give_up_after_s: float = GIVE_UP_AFTER_S
) -> None:
    """Wait while another process builds an op (its lock file exists): one line on stderr naming the
    file after `warn_after_s`, and ValueError naming it after `give_up_after_s` (a killed build's
    leftover, to delete)."""
    start, warned = time.monotonic(), False
    for lock in locks:
        while lock.exists():
            waited = time.monotonic() - start
            if waited >= give_up_after_s:
                raise ValueError(
                    f"DeepSpeed op build lock {lock} has been held for {waited:.0f} s: a build killed "
                    "midway leaves it behind; if no other process is building the op, delete the file"
                )
            if waited >= warn_after_s and not warned:
                print(
                    f"waiting for {lock} (another process is building a DeepSpeed op, or a killed build "
                    f"left the file: delete it if so); giving up after {give_up_after_s:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
            time.sleep(0.2)
