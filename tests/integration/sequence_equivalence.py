"""Run under torchrun: sequence-parallel forward outputs, losses and full gradients for a fixed batch.

`python -m torch.distributed.run --nproc_per_node N tests/integration/sequence_equivalence.py OUT MODE`

- MODE `model` (N = sequence_parallel = 2): for a video model, a packed-image batch (segments, so temporal
  attention is masked) and an SSR model, the same whole batch on both ranks; rank 0 also runs it in
  this process without any split (the one-process reference) and writes both: the model's output
  (every rank's frames gathered), the loss and every parameter's gradient (averaged over the ranks, as
  DeepSpeed averages them).
- MODE `deepspeed SP STAGE[,STAGE...]`: one 4-sample global batch split over the world / SP
  data-parallel groups (N = 1 and SP = 1: one process, the reference), one DeepSpeed step's loss and
  full gradients (gathered across ZeRO partitions) per ZeRO stage, written by rank 0. STAGE `3c` is
  ZeRO-3 with activation checkpointing.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from configs import load_config
from stages.train import init_distributed, leave_distributed
from stages.train.sequence_parallel import Layout, SequenceGroup
from stages.train.trainer import DiffusionTrainer

GEOMETRY = ["data.frames=4", "data.height=8", "data.width=8", "model.pos_embed=sincos"]
"""T' = 4 frames and S = 16 positions: both split over 2 ranks; sincos checks the frame offsets."""
KINDS = {
    "video": [],
    "images": ["model.pos_embed=rope"],
    "ssr": ["model.kind=ssr", "model.sr_factor=2", "model.pos_embed=rope"],
}


def batch(kind: str, items: int, frames: int) -> dict:
    """A fixed batch: (x0, t, noise, keyword arguments of DiffusionTrainer.forward)."""
    g = torch.Generator().manual_seed(7)
    shape = (items, 3, frames, 8, 8)
    x = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    kwargs: dict = {"text": None, "text_mask": None}
    if kind == "images":  # per-frame times, captions, dropout; runs of 1-3 frames as segments
        t = torch.rand(items, frames, generator=g)
        kwargs |= {
            "captions": [f"image {i}" for i in range(items * frames)],
            "fps": torch.zeros(items, frames),
            "drop_text": torch.rand(items, frames, generator=g) < 0.3,
            "segments": torch.tensor([[0, 0, 0, 1], [0, 1, 1, 2], [0, 1, 2, 3], [0, 0, 1, 1]][:items]),
        }
    else:
        t = torch.rand(items, generator=g)
        kwargs |= {
            "captions": ["a red circle", "a blue square", "", "a green line"][:items],
            "fps": torch.full((items,), 8.0),
            "drop_text": torch.tensor([False, True, False, False][:items]),
        }
    if kind == "ssr":
        kwargs |= {"cond": torch.rand(shape, generator=g) * 2 - 1, "cond_aug": torch.rand(items, generator=g)}
    return {"x0": x, "t": t, "noise": noise, **kwargs}


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised gates would leave most first-step gradients exactly 0."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def loss_output_grads(module: DiffusionTrainer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, the model's output, gradients) of one forward and backward."""
    outputs = []
    hook = module.dit.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    loss = module(**inputs).mean()
    hook.remove()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), outputs[0], grads


def model_mode(out: str, rank: int, world: int) -> None:
    group = SequenceGroup.create(Layout(rank, world, world))
    state = {}
    for kind, overrides in KINDS.items():
        cfg = load_config(["configs/tiny.yaml"], overrides=[*GEOMETRY, *overrides])
        torch.manual_seed(0)
        split = perturbed(DiffusionTrainer(cfg, group))
        loss, output, grads = loss_output_grads(split, batch(kind, 2, cfg.data.frames))
        output = group.gather_frames(output.transpose(1, 2)).transpose(1, 2)  # (B, C, T, H, W)
        for g in grads.values():  # DeepSpeed's averaging over the ranks
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.manual_seed(0)
            whole = perturbed(DiffusionTrainer(cfg))
            ref_loss, ref_output, ref_grads = loss_output_grads(whole, batch(kind, 2, cfg.data.frames))
            state |= {f"{kind}.split.loss": loss.reshape(1), f"{kind}.whole.loss": ref_loss.reshape(1)}
            state |= {f"{kind}.split.output": output, f"{kind}.whole.output": ref_output}
            state |= {f"{kind}.split.grad.{n}": g for n, g in grads.items()}
            state |= {f"{kind}.whole.grad.{n}": g for n, g in ref_grads.items()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, out)


def deepspeed_mode(out: str, rank: int, world: int, sp: int, stages: list[str]) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from stages.train.parallelize import deepspeed_config, restore_torch_linear

    layout = Layout(rank, world, sp)
    group = SequenceGroup.create(layout)
    global_batch = 4
    items = global_batch // layout.dp
    inputs = batch("video", global_batch, 4)
    mine = slice(layout.dp_rank * items, (layout.dp_rank + 1) * items)
    inputs = {
        k: v[mine] if isinstance(v, (torch.Tensor, list)) and k != "text" else v for k, v in inputs.items()
    }
    state = {}
    for stage in stages:
        checkpointing = stage.endswith("c")
        overrides = [
            *GEOMETRY,
            f"data.batch_size={items}",
            f"parallel.sequence_parallel={sp}",
            f"parallel.zero_stage={stage.rstrip('c')}",
            f"parallel.activation_checkpointing={str(checkpointing).lower()}",
        ]
        cfg = load_config(["configs/tiny.yaml"], overrides=overrides)
        if cfg.parallel.zero_stage != 3:
            restore_torch_linear()
        torch.manual_seed(0)
        module = perturbed(DiffusionTrainer(cfg, group))
        engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, world),
            dist_init_required=False,
        )
        loss = engine(**inputs).mean()
        engine.backward(loss)
        total = loss.detach().clone()
        dist.all_reduce(total)  # every rank of a group holds its samples' whole loss
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
        if rank == 0:
            state[f"{stage}.loss"] = (total / world).reshape(1)
            state |= {f"{stage}.grad.{n}": g.detach().float().contiguous() for n, g in grads.items()}
        engine.destroy()
    if rank == 0:
        save_file(state, out)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    rank, world, _ = init_distributed()
    if mode == "model":
        model_mode(out, rank, world)
    else:
        deepspeed_mode(out, rank, world, int(sys.argv[3]), sys.argv[4].split(","))


if __name__ == "__main__":
    main()
    leave_distributed(0)
