"""The module DeepSpeed wraps and what lives beside it: `DiffusionTrainer` (the DiT plus the jointly
trained byte text encoder; a frozen T5 and a distillation teacher stay outside, so their weights never
enter checkpoints or the optimizer), the fp32 `Ema` of the weights, and `full_state`, the gathered fp32
state dict that checkpoints export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from configs import RunConfig
from models.diffusion import CosineSchedule, classifier_free_guidance, distillation_loss, training_loss
from models.dit import VideoDiT
from models.text import ByteTextEncoder
from stages.train.distill import Teacher, student_weights
from stages.train.parallelize import parallelize_model
from stages.train.sequence_parallel import SequenceGroup


class DiffusionTrainer(nn.Module):
    """Per-sample diffusion loss of a batch; holds every trainable parameter.

    With a `sequence` group (parallel.sequence_parallel > 1) every rank of the group is given the same
    whole batch, runs the model on its slice of frames, and returns the samples' whole loss (the group
    mean of the slices' losses; see `stages/train/sequence_parallel.py` for its gradient).

    With a `teacher` (a distillation run, `stages/train/distill.py`) the model and text encoder start
    from the teacher's weights and the loss is the distillation loss at the student's grid times."""

    def __init__(
        self, cfg: RunConfig, sequence: SequenceGroup | None = None, teacher: Teacher | None = None
    ) -> None:
        super().__init__()
        self.sequence = sequence
        dit = VideoDiT(cfg.model)
        self.text = ByteTextEncoder.from_config(cfg.text) if cfg.text.encoder == "byte" else None
        self.teacher = teacher
        """Not a submodule: DeepSpeed never sees it (moved to the device by `TrainingRun`)."""
        if teacher is not None:
            dit_state, text_state = student_weights(teacher)
            dit.load_weights(dit_state)
            if self.text is not None and text_state is not None:
                self.text.load_state_dict(text_state)
        self.dit = parallelize_model(dit, cfg.parallel, compile_blocks=cfg.train.compile)
        self.student_steps = cfg.distill.steps
        self.schedule = CosineSchedule.from_config(
            cfg.diffusion, cfg.data.frames * cfg.data.height * cfg.data.width
        )
        self.diffusion = cfg.diffusion

    def forward(
        self,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        captions: list[str] | None,
        text: Tensor | None,
        text_mask: Tensor | None,
        fps: Tensor,
        drop_text: Tensor,
        segments: Tensor | None = None,
        cond: Tensor | None = None,
        cond_aug: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        frozen = text is not None  # embeddings from the batch or a frozen T5: the teacher sees them too
        if not frozen:
            if self.text is None:
                raise ValueError("no text embeddings in the batch and no trainable text encoder")
            text, text_mask = _encode(self.text, captions, drop_text, x0.dtype)
        sp, d = self.sequence, self.diffusion
        if sp is not None:  # this rank's frames of everything that has frames
            x0, noise = sp.shard(x0, 2), sp.shard(noise, 2)  # (B, C, T/N, H, W)
            t, fps, drop_text = (v if v.dim() == 1 else sp.shard(v, 1) for v in (t, fps, drop_text))
            text, text_mask = _shard_text(sp, text, text_mask)
            segments = None if segments is None else sp.shard(segments, 1)
            if cond is not None:
                cond = sp.shard(cond, 2)
                cond_aug = cond_aug if cond_aug.dim() == 1 else sp.shard(cond_aug, 1)
        kwargs = {
            "fps": fps,
            "segments": segments,
            **({} if cond is None else {"cond": cond, "cond_aug": cond_aug}),
            **({} if sp is None else {"sequence": sp}),
        }
        if self.teacher is None:
            loss = training_loss(
                self.dit,
                x0,
                t,
                noise,
                self.schedule,
                d.prediction,
                d.loss_weighting,
                d.min_snr_gamma,
                text=text,
                text_mask=text_mask,
                drop_text=drop_text,
                **kwargs,
            )  # fmt: skip  (B,)
        else:
            teacher_text = (text, text_mask)
            if not frozen and self.teacher.text is not None:
                teacher_text = _encode(self.teacher.text, captions, drop_text, x0.dtype)
                if sp is not None:
                    teacher_text = _shard_text(sp, *teacher_text)
            loss = distillation_loss(
                lambda x, t_: self.dit(
                    x, t_, text=text, text_mask=text_mask, drop_text=drop_text, guidance=guidance, **kwargs
                ),
                self._teacher_fn(teacher_text, drop_text, guidance, kwargs),
                x0,
                t,
                noise,
                self.schedule,
                self.student_steps,
                self.teacher.prediction,
                d.prediction,
                d.loss_weighting,
                d.min_snr_gamma,
            )  # fmt: skip  (B,)
        return loss if sp is None else sp.mean(loss)

    def _teacher_fn(
        self, text: tuple[Tensor, Tensor | None], drop_text: Tensor, guidance: Tensor | None, kwargs: dict
    ):
        """(x, t) → the teacher's prediction (float32): guided at the student's weights `guidance` (the
        teacher's own guidance input, or classifier-free guidance of a teacher without one), else
        conditioned as the student is (its text dropped where the student's is)."""
        teacher = self.teacher
        dtype = next(teacher.dit.parameters()).dtype
        kw = {**kwargs, "text": text[0], "text_mask": text[1]}
        if guidance is None or teacher.guided:
            own = {} if guidance is None else {"guidance": guidance}
            return lambda x, t: teacher.dit(x.to(dtype), t, drop_text=drop_text, **own, **kw).float()
        return lambda x, t: classifier_free_guidance(teacher.dit, x.to(dtype), t, guidance, **kw).float()


def _encode(
    encoder: nn.Module, captions: list[str] | None, drop_text: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """A byte text encoder's (text, text_mask) of the batch's captions, per packed frame for images."""
    emb = encoder(captions)
    text, text_mask = emb.tokens.to(dtype), emb.mask
    if drop_text.dim() == 2:  # packed images: one caption per frame
        b, f = drop_text.shape
        text, text_mask = text.view(b, f, *text.shape[1:]), text_mask.view(b, f, -1)
    return text, text_mask


def _shard_text(sp: SequenceGroup, text: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """This rank's frames of per-frame text (packed images); per-clip text is every rank's."""
    if text.dim() != 4:
        return text, text_mask
    return sp.shard(text, 1), None if text_mask is None else sp.shard(text_mask, 1)


# --------------------------------------------------------------------------------------------------
# EMA of the weights, kept in fp32 (under ZeRO-3 each rank keeps the EMA of its own partition)
# --------------------------------------------------------------------------------------------------


def local_tensor(p: Tensor) -> Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class Ema:
    """fp32 exponential moving average of parameters (or of their ZeRO-3 partitions)."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [local_tensor(p).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(local_tensor(p).detach().float(), 1.0 - self.decay)

    def state(self) -> list[Tensor]:
        return [s.cpu() for s in self.shadow]

    def load(self, state: list[Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}")
        for s, saved in zip(self.shadow, state, strict=True):
            s.copy_(saved)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA values into the parameters (their local partitions)."""
        saved = [local_tensor(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                local_tensor(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for keep, p in zip(saved, self.params, strict=True):
                    local_tensor(p).copy_(keep)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state(module: nn.Module, zero3: bool) -> dict[str, Tensor] | None:
    """Collective: the full fp32 state dict of `module` on rank 0 (None elsewhere), gathering ZeRO-3."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return state if _rank() == 0 else None
