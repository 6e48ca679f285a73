"""The teacher of a distillation run (`distill.teacher`): read from a committed checkpoint of another
training, checked against the student's config, frozen, and kept out of the module DeepSpeed wraps (like
a frozen T5: its weights never enter the optimizer, the checkpoints or the exports).

A round of progressive distillation (`distill.steps = N`) is an ordinary training whose loss is
`models.diffusion.distillation_loss`: the student starts from the teacher's EMA weights, sees times on
its N-step grid, and learns to take in one DDIM step the two its teacher takes. A guidance round
(`distill.steps = 0`, a student with `model.guidance_range`) folds classifier-free guidance into a model
that takes the weight as an input. Each round is its own training (out_dir, checkpoints, exact resume,
every launcher), and the next round names it as its teacher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from configs import ConfigError, RunConfig, load_config
from models.dit import VideoDiT
from stages.artifacts import exported_files, load_exported, resolve_committed

SCHEDULE_FIELDS = ("logsnr_min", "logsnr_max", "shift_reference_numel")
"""Diffusion fields a student shares with its teacher: they define the noise schedule both walk."""


@dataclass
class Teacher:
    """A frozen teacher: its DiT, its own byte text encoder (None with a frozen T5, whose embeddings the
    batch or the trainer's encoder gives both models) and what it predicts."""

    dit: VideoDiT
    text: nn.Module | None
    prediction: str
    step: Path
    """The committed step directory it was read from."""
    steps: int
    """Its own sampling steps: twice the student's, or 0 when it is not itself distilled."""

    @property
    def guided(self) -> bool:
        """It takes the guidance weight as an input (a guidance-distilled model)."""
        return self.dit.guidance_embed is not None

    def to(self, device, dtype) -> Teacher:
        self.dit.to(device, dtype)
        if self.text is not None:
            self.text.to(device)
        return self


def teacher_config(cfg: RunConfig) -> tuple[Path, RunConfig]:
    """(step directory, run config) of `distill.teacher`, checked against the student's config: the same
    model (but for the guidance input), text encoder and noise schedule, and a step count twice the
    student's when the teacher is itself distilled. FileNotFoundError or ValueError naming the teacher."""
    d = cfg.distill
    step = resolve_committed(d.teacher, "distill.teacher").resolve()
    where = f"distill.teacher {step}"
    try:
        teacher = load_config([step / "config.yaml"])
    except (ConfigError, FileNotFoundError) as err:
        raise ValueError(f"{where}: not a readable training checkpoint: {err}") from None
    for path in exported_files(step, teacher):
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {path} is missing (the teacher's exported EMA weights)")
    own = dataclasses.replace(cfg.model, guidance_range=teacher.model.guidance_range)
    differ = [
        f.name for f in dataclasses.fields(own) if getattr(own, f.name) != getattr(teacher.model, f.name)
    ]
    if differ:
        fields = ", ".join(
            f"model.{n}: {getattr(teacher.model, n)!r} ≠ {getattr(cfg.model, n)!r}" for n in differ
        )
        raise ValueError(f"{where}: the student's model must be the teacher's ({fields})")
    if teacher.model.guidance_range and teacher.model.guidance_range != cfg.model.guidance_range:
        raise ValueError(
            f"{where}: the teacher takes guidance weights {teacher.model.guidance_range}; the student "
            f"must too (model.guidance_range is {cfg.model.guidance_range})"
        )
    if teacher.text != cfg.text:
        raise ValueError(f"{where}: the student's text section must be the teacher's")
    for name in SCHEDULE_FIELDS:
        if getattr(teacher.diffusion, name) != getattr(cfg.diffusion, name):
            raise ValueError(
                f"{where}: diffusion.{name} is {getattr(teacher.diffusion, name)} for the teacher and "
                f"{getattr(cfg.diffusion, name)} for the student; both must walk the same noise schedule"
            )
    earlier = teacher.distill.steps
    if earlier and d.steps and earlier != 2 * d.steps:
        raise ValueError(
            f"{where}: the teacher samples in {earlier} steps, so its student learns {earlier // 2} "
            f"(distill.steps is {d.steps}; each round halves the steps)"
        )
    return step, teacher


def load_teacher(cfg: RunConfig) -> Teacher:
    """The frozen teacher of a distillation run (see `teacher_config`), its EMA weights on the CPU."""
    step, teacher = teacher_config(cfg)
    dit, text = load_exported(step, teacher)
    dit.requires_grad_(False).eval()
    byte_text = None
    if teacher.text.encoder == "byte":
        byte_text = text.requires_grad_(False).eval()
    steps = teacher.distill.steps or 2 * cfg.distill.steps
    return Teacher(dit, byte_text, teacher.diffusion.prediction, step, steps)


def student_weights(teacher: Teacher) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The student's first weights: the teacher's (its guidance input, if new, starts at zero)."""
    dit = {k: v.detach().clone() for k, v in teacher.dit.state_dict().items()}
    text = (
        None
        if teacher.text is None
        else {k: v.detach().clone() for k, v in teacher.text.state_dict().items()}
    )
    return dit, text
