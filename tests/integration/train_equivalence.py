"""Run under torchrun: one DeepSpeed step's loss and full gradients for a fixed global batch.

`python -m torch.distributed.run --nproc_per_node N tests/integration/train_equivalence.py OUT [k=v...]`
splits the same 4-sample global batch over N ranks and writes, from rank 0, the mean loss over the global
batch and every parameter's full gradient (gathered across ZeRO partitions) to OUT (safetensors).
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from configs import load_config
from stages.train import init_distributed, leave_distributed
from stages.train.parallelize import deepspeed_config
from stages.train.trainer import DiffusionTrainer

GLOBAL_BATCH = 4


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    rank, world, _ = init_distributed()
    cfg = load_config(
        ["configs/tiny.yaml"], overrides=[*overrides, f"data.batch_size={GLOBAL_BATCH // world}"]
    )
    torch.manual_seed(cfg.train.seed)
    module = DiffusionTrainer(cfg)
    with torch.no_grad():  # zero-initialised gates would leave most first-step gradients exactly 0
        for p in module.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world),
        dist_init_required=False,
    )
    g = torch.Generator().manual_seed(123)
    shape = (GLOBAL_BATCH, 3, cfg.data.frames, cfg.data.height, cfg.data.width)
    x = torch.rand(shape, generator=g) * 2 - 1
    t = torch.rand(GLOBAL_BATCH, generator=g)
    noise = torch.randn(shape, generator=g)
    drop = torch.tensor([False, True, False, False])
    captions = ["a red circle moving left", "a blue square", "a green triangle moving up", ""]
    mine = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    per_sample = engine(
        x[mine],
        t[mine],
        noise[mine],
        captions=captions[mine],
        text=None,
        text_mask=None,
        fps=torch.full((GLOBAL_BATCH // world,), 8.0),
        drop_text=drop[mine],
    )
    loss = per_sample.mean()
    engine.backward(loss)
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters() if p.requires_grad}
    if rank == 0:
        state = {f"grad.{k}": v.detach().float().contiguous() for k, v in grads.items()}
        state["loss"] = (total / world).reshape(1)
        save_file(state, out)


if __name__ == "__main__":
    main()
    leave_distributed(0)
