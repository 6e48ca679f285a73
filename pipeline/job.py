"""The end-to-end job of `pipeline run`: a `PipelineConfig` turned into the stage graph.

    synth ──▶ preprocess ──┬──▶ train-base ──▶ train-base-distill-10 ─┐
    (or ingest `inputs`)   ├──▶ train-tsr  ───────────────────────────┼──▶ render ─────────┬──▶ report
                           └──▶ train-ssr  ───────────────────────────┘   render-teacher ─┘

A training with `distill.rounds` (and `distill.guidance`) is followed by its distillation rounds, each a
training of its own (`{training}-guidance`, then `{training}-distill-{steps}`) whose teacher is the one
before; its cascade stage renders the last student (`distilled`), and `render-teacher` renders the same
prompts through the undistilled cascade for the report's side-by-side comparison.

Run directory (`out_dir`):

- `data/`: the synthetic dataset (the synth stage; absent when `inputs` are ingested);
- `shards/`: the preprocess output (`shards/*.tar`, manifest.json, failures.jsonl, lineage.jsonl);
- `{training}/`: each model's `train.out_dir` (checkpoints/, metrics.jsonl, tensorboard/);
- `renders/`: one folder per prompt (docs/RENDERING.md); `renders-teacher/`: the same prompts through
  the teachers of distilled stages;
- `index.html`, `contact_sheet.png`: the report;
- `pipeline/`: `config.yaml` (the resolved pipeline config), `cascade.yaml` (the cascade as rendered,
  checkpoints included: `render --cascade` takes it for new prompts) and, with distilled stages,
  `cascade-teacher.yaml` (the undistilled one), `graph.json`, `stages/*.json`;
- `.tessera-lock`: held while a run writes the directory (`stages/folder_lock.py`).

Every stage's config is loaded and cross-checked when the graph is built, so a typo in the render
cascade fails before an hour of training. The work runs on Ray (in-process unless `address`):
preprocessing as Ray Data, every training as its own Ray Train run (so trainings run side by side
when the cluster has room for their workers), rendering on replica pools per cascade stage.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from configs import (
    CascadeConfig,
    ConfigError,
    PipelineConfig,
    PipelineTrainingConfig,
    RenderConfig,
    RunConfig,
    check_stage_model,
    dump_config,
    fingerprint,
    load_cascade,
    load_config,
    to_dict,
    validate_cascade,
)
from configs.validate import validate
from pipeline.graph import GraphStage, Plan

RENDERS = "renders"
TEACHER_RENDERS = "renders-teacher"
SHARDS = "shards"
DATA = "data"


def load_pipeline(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> PipelineConfig:
    """A pipeline config from YAML files and dotted overrides (`synth.count=64`,
    `trainings.base.workers=2`); strict and validated like a run config."""
    return load_config(paths, overrides, schema=PipelineConfig)


def split_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line style items → (YAML paths, key=value overrides), each in the order given."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def _run_config(items: Sequence[str], where: str) -> RunConfig:
    """The run config of `items` (YAML paths and overrides); a ConfigError names `where`."""
    paths, overrides = split_items(items)
    try:
        return load_config(paths, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _checked(run: RunConfig, where: str) -> RunConfig:
    """`run` once validated again, after the job has set its paths; a ConfigError names `where`."""
    try:
        validate(run)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return run


class PipelineJob:
    """The loaded, cross-checked configs of one pipeline run, and its stages."""

    def __init__(self, cfg: PipelineConfig, address: str | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.address = address
        self.progress = progress
        self.out = Path(cfg.out_dir)
        self.inputs = list(cfg.inputs) or [str(self.out / DATA)]
        pre = _run_config(cfg.preprocess, "preprocess")
        pre = replace(pre, preprocess=replace(pre.preprocess, out=str(self.out / SHARDS)))
        self.preprocess = _checked(pre, "preprocess")
        self.trainings: dict[str, RunConfig] = {}
        """Every training by name, distillation rounds included (after their teachers)."""
        self.launch: dict[str, PipelineTrainingConfig] = {}
        """How each training launches (a round as the training it distils)."""
        self.after: dict[str, str] = {}
        """The graph stage each training waits for: preprocess, or its teacher's training."""
        self.students: dict[str, str] = {}
        """A distilled training's name → its last round's name."""
        for name, t in cfg.trainings.items():
            self._add_training(name, t.config, t, "preprocess", f"trainings.{name}")
            teacher = name
            for label, extra in _distill_rounds(t.distill.rounds, t.distill.guidance):
                round_name = f"{name}-{label}"
                items = [*t.config, *t.distill.config, f"distill.teacher={self.out / teacher}", *extra]
                where = f"trainings.{name}.distill (round {label})"
                self._add_training(round_name, items, t, f"train-{teacher}", where)
                teacher = self.students[name] = round_name
        for name, run in self.trainings.items():
            self._check_geometry(name, run)
        self.cascade = self._load_cascade() if cfg.cascade else None
        self.render = replace(cfg.render, out_dir=str(self.out / RENDERS))

    def _add_training(
        self, name: str, items: list[str], launch: PipelineTrainingConfig, after: str, where: str
    ) -> None:
        """A training's run config (of `items`), reading the preprocessed shards and writing to
        `{out_dir}/{name}`, launched as `launch` after the graph stage `after`."""
        run = _run_config(items, where)
        run = replace(
            run,
            data=replace(run.data, shards=str(self.out / SHARDS / "shards")),
            train=replace(run.train, out_dir=str(self.out / name)),
        )
        self.trainings[name] = _checked(run, where)
        self.launch[name], self.after[name] = launch, after

    # ------------------------------------------------------------------------------------------ checks

    def _check_geometry(self, name: str, run: RunConfig) -> None:
        """A training reads the preprocessed clips as they are, or shrunk (data.reduce), never grown."""
        have, want = self.preprocess.data, run.data
        shape = (want.frames, want.height, want.width)
        source = (have.frames, have.height, have.width)
        if shape == source and want.fps == have.fps:
            return
        if not want.reduce:
            raise ConfigError(
                f"trainings.{name}: data {'×'.join(map(str, shape))} @ {want.fps:g} fps differs from the "
                f"preprocessed clips ({'×'.join(map(str, source))} @ {have.fps:g} fps); set data.reduce=true "
                "to shrink them, or preprocess at this geometry"
            )
        if any(w > h or h % w for w, h in zip(shape, source, strict=True)):
            raise ConfigError(
                f"trainings.{name}: data.reduce shrinks by whole factors, but {'×'.join(map(str, shape))} "
                f"does not divide the preprocessed {'×'.join(map(str, source))}"
            )

    def _load_cascade(self) -> CascadeConfig:
        """The cascade with each stage named like a training pointed at that training's out_dir."""
        cfg = self.cfg
        cascade = load_cascade(cfg.cascade, cfg.cascade_overrides)
        names = [s.name for s in cascade.stages]
        unknown = sorted(set(cfg.trainings) - set(names))
        if unknown:
            raise ConfigError(
                f"trainings {unknown} match no stage of {cfg.cascade} (stages: {names}); "
                "a training renders in the cascade stage of the same name"
            )
        pointed = [
            replace(s, checkpoint=str(self.out / s.name), distilled=self._student_dir(s.name))
            if s.name in cfg.trainings
            else s
            for s in cascade.stages
        ]
        cascade = replace(cascade, stages=pointed)
        try:
            validate_cascade(cascade)
        except ValueError as err:
            raise ConfigError(f"{cfg.cascade}: {err}") from None
        for i, stage in enumerate(cascade.stages):
            run = self.trainings.get(stage.name)
            if run is None:
                if not stage.checkpoint:
                    raise ConfigError(
                        f"{cfg.cascade}: stage '{stage.name}' has no checkpoint and no training of that name"
                    )
                continue
            where = f"trainings.{stage.name} for cascade stage '{stage.name}'"
            check_stage_model(cascade, i, run.model, where)
            d = run.data
            if (d.frames, d.height, d.width, d.fps) != (stage.frames, stage.height, stage.width, stage.fps):
                raise ConfigError(
                    f"{where}: trains on {d.frames}×{d.height}×{d.width} @ {d.fps:g} fps, but the stage "
                    f"outputs {stage.frames}×{stage.height}×{stage.width} @ {stage.fps:g} fps"
                )
        return cascade

    # ------------------------------------------------------------------------------------------ stages

    def stages(self) -> list[GraphStage]:
        """The graph, in topological order."""
        from stages.train import training_plan

        cfg, out = self.cfg, self.out
        stages: list[GraphStage] = []
        if not cfg.inputs:
            stages.append(
                GraphStage(
                    "synth",
                    (),
                    fingerprint(asdict(cfg.synth)),
                    [out / DATA],
                    self._synth,
                    f"{cfg.synth.count} synthetic captioned files → {out / DATA}",
                )
            )
        stages.append(
            GraphStage(
                "preprocess",
                ("synth",) if not cfg.inputs else (),
                fingerprint({"config": to_dict(self.preprocess), "inputs": self.inputs}),
                [out / SHARDS],
                self._preprocess,
                f"{', '.join(self.inputs)} → {out / SHARDS}",
            )
        )
        for name, run in self.trainings.items():
            t = self.launch[name]
            stages.append(
                GraphStage(
                    f"train-{name}",
                    (self.after[name],),
                    fingerprint({"config": to_dict(run), "workers": t.workers}),
                    [out / name],
                    self._trainer(name),
                    f"{run.model.kind} model, {run.train.steps} steps, {t.workers} worker(s) → {out / name}",
                    resources=_training_resources(t),
                    # each worker's FLOPs, which bound the training's time: the longest starts first
                    cost=run.train.steps * training_plan(run, 1)["flops_per_step"],
                )
            )
        trained = tuple(f"train-{name}" for name in self.trainings)
        if self.cascade is not None:
            stages.append(
                GraphStage(
                    "render",
                    trained,
                    fingerprint(self._render_settings()),
                    [out / RENDERS],
                    lambda: self._render(self.cascade, self.render),
                    f"{len(cfg.prompts)} prompts through {len(self.cascade.stages)} stages → {out / RENDERS}",
                )
            )
        rendered = ("render",) if self.cascade is not None else trained
        if self.students and self.cascade is not None:
            teachers, settings = self._teacher_render()
            stages.append(
                GraphStage(
                    "render-teacher",
                    trained,
                    fingerprint(self._render_settings(teachers)),
                    [out / TEACHER_RENDERS],
                    lambda: self._render(teachers, settings),
                    f"the prompts through the undistilled cascade → {out / TEACHER_RENDERS}",
                )
            )
            rendered = ("render", "render-teacher")
        stages.append(
            GraphStage(
                "report",
                rendered,
                fingerprint({"name": cfg.name}),
                [out / "index.html"],
                self._report,
                f"loss plots, videos per stage, contact sheet → {out / 'index.html'}",
            )
        )
        return stages

    def _student_dir(self, name: str) -> str:
        return str(self.out / self.students[name]) if name in self.students else ""

    def _teacher_render(self) -> tuple[CascadeConfig, RenderConfig]:
        """The cascade with every stage's `distilled` cleared, and where it renders."""
        stages = [replace(s, distilled="") for s in self.cascade.stages]
        return replace(self.cascade, stages=stages), replace(
            self.render, out_dir=str(self.out / TEACHER_RENDERS)
        )

    def _render_settings(self, cascade: CascadeConfig | None = None) -> dict[str, Any]:
        """What the render stage's outputs depend on, for its fingerprint: the cascade, the prompts, the
        seed, and each other output-changing render setting only while it is not at its default (so a new
        setting leaves the fingerprints of runs at the defaults as they are). render.batch_size (the same
        videos: every prompt has its own generators) and render.out_dir (the outputs' place) do not count.
        """
        cascade = self.cascade if cascade is None else cascade
        settings = {"cascade": to_dict(cascade), "prompts": self.cfg.prompts, "seed": self.render.seed}
        default = RenderConfig()
        for name in ("precision", "save_intermediate", "contact_sheet"):
            if getattr(self.render, name) != getattr(default, name):
                settings[name] = getattr(self.render, name)
        return settings

    def start_ray(self, plan: Plan) -> dict[str, float] | None:
        """Start (or connect to) Ray in this, the main, thread if any stage that uses Ray will run, and
        return the cluster's CPUs and GPUs (run_graph's capacity; None when Ray is not needed).

        Not from a stage's thread: an in-process Ray's raylet dies with the thread that started it
        (it is spawned with a parent-death signal), which would take the whole cluster down when that
        stage's thread ends.
        """
        if not any(plan.action[name] == "run" for name in plan.action if name not in ("synth", "report")):
            return None
        import ray

        from pipeline.ray_cluster import ensure_ray

        ensure_ray(self.address)
        total = ray.cluster_resources()
        return {key: float(total[key]) for key in ("CPU", "GPU") if key in total}

    def write_config(self) -> None:
        """The resolved pipeline config and cascades, for the report, for reproducing the run and for
        rendering more prompts with its models."""
        path = self.out / "pipeline" / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, path)
        if self.cascade is not None:
            dump_config(self.cascade, path.parent / "cascade.yaml")
            if self.students:
                dump_config(self._teacher_render()[0], path.parent / "cascade-teacher.yaml")

    # ------------------------------------------------------------------------------------------- work

    def _synth(self) -> str:
        from stages.synth import run_synth

        summary = run_synth(self.out / DATA, self.cfg.synth, progress=self.progress)
        return f"{summary.videos} videos and {summary.images} images"

    def _preprocess(self) -> str:
        from pipeline.ray_preprocess import ray_executor
        from stages.preprocess import run_preprocess

        m = run_preprocess(self.preprocess, self.inputs, ray_executor(self.address), progress=self.progress)
        return (
            f"{m['processed']} of {m['discovered']} inputs → {m['samples']} samples in "
            f"{len(m['shards'])} shards, {m['failed']} failed (see failures.jsonl)"
        )

    def _trainer(self, name: str):
        def run() -> str:
            from pipeline.ray_train import ray_train

            cfg, t = self.trainings[name], self.launch[name]
            stop = threading.Event()
            follower = threading.Thread(target=self._follow, args=(name, cfg, stop), daemon=True)
            follower.start()
            try:
                result = ray_train(
                    cfg,
                    resume="auto",
                    address=self.address,
                    workers=t.workers,
                    min_workers=t.min_workers,
                    cpus_per_worker=t.cpus_per_worker,
                    gpus_per_worker=t.gpus_per_worker,
                    wait_for_workers_s=t.wait_for_workers_s,
                )
            finally:
                stop.set()
                follower.join()
            loss = _loss(_last_metrics(cfg)) or "n/a"
            return f"{result.step} steps, last loss {loss}, checkpoint {result.checkpoint}"

        return run

    def _follow(self, name: str, cfg: RunConfig, stop: threading.Event) -> None:
        """A progress bar for a training that runs in Ray workers, fed by its metrics.jsonl."""
        if not self.progress:
            return
        index = list(self.trainings).index(name)
        with tqdm(
            total=cfg.train.steps, desc=f"train-{name}", unit="step", position=index, leave=True
        ) as bar:
            while not stop.wait(2.0):
                metrics = _last_metrics(cfg)
                if isinstance(metrics.get("step"), int):
                    bar.n = metrics["step"] + 1
                    bar.set_postfix(loss=_loss(metrics), refresh=False)
                    bar.refresh()

    def _render(self, cascade: CascadeConfig, settings: RenderConfig) -> str:
        from pipeline.ray_render import ray_executor
        from stages.render import FAILURES, render

        cfg = self.cfg
        summary = render(
            cascade,
            cfg.prompts,
            settings,
            cascade_file=cfg.cascade,
            executor=ray_executor(self.address),
            progress=self.progress,
        )
        if summary.failures:
            first = summary.failures[0]
            raise RuntimeError(
                f"{len(summary.failures)} of {len(summary.prompts)} prompts failed "
                f"(first: prompt {first['index']} at {first['stage']}: {first['reason']}); see "
                f"{summary.out_dir / FAILURES}"
            )
        return f"{len(summary.prompts)} videos in {summary.out_dir} ({summary.seconds:.0f} s)"

    def _report(self) -> str:
        from stages.report import write_report

        configs = {"pipeline": dump_config(self.cfg)}
        configs |= {f"training {name}": dump_config(run) for name, run in self.trainings.items()}
        if self.cascade is not None:
            configs["cascade"] = dump_config(self.cascade)
        summary = write_report(
            self.out,
            title=self.cfg.name,
            configs=configs,
            trainings={name: self.out / name for name in self.trainings},
            render_dir=self.out / RENDERS,
            teacher_dir=self.out / TEACHER_RENDERS if self.students and self.cascade is not None else None,
        )
        text = f"{summary.path}"
        checks = (("prompt checks", summary.adherence), ("teachers", summary.teacher_adherence))
        for label, adherence in checks:
            scores = "; ".join(
                f"{stage}: colour {c['color']}/{c['judged']}, shape {c['shape']}/{c['judged']}, "
                f"direction {c['direction']}/{c['moving']}"
                for stage, c in adherence.items()
            )
            text += f" ({label} {scores})" if scores else ""
        return text


def _distill_rounds(rounds: list[int], guidance: list[float]) -> list[tuple[str, list[str]]]:
    """(label, run-config overrides) of each distillation round: a guidance round first when `guidance`
    is set, then one round per student step count (every student of a guided chain takes the weight)."""
    takes = [f"model.guidance_range=[{guidance[0]},{guidance[1]}]"] if guidance else []
    first = [("guidance", ["distill.steps=0", *takes])] if guidance else []
    return first + [(f"distill-{steps}", [f"distill.steps={steps}", *takes]) for steps in rounds]


def _training_resources(t: PipelineTrainingConfig) -> dict[str, float]:
    """What a training's Ray Train workers hold, as run_graph accounts for it."""
    held = {"CPU": float(t.workers * t.cpus_per_worker)}
    if t.gpus_per_worker:
        held["GPU"] = t.workers * t.gpus_per_worker
    return held


def _last_metrics(cfg: RunConfig) -> dict:
    """The last line of a training's metrics.jsonl ({} while there is none)."""
    path = Path(cfg.train.out_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _loss(metrics: dict) -> str:
    """A metrics line's loss, formatted ("" when it has none)."""
    loss = metrics.get("loss")
    return f"{loss:.4f}" if isinstance(loss, float) else ""
