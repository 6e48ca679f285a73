"""Command line: `python -m pipeline COMMAND ...`.

Configs are given as YAML paths followed by dotted overrides (`model.depth=12`), in order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from configs import ConfigError, RunConfig, dump_config, fingerprint, load_config

NOT_YET = {
    "preprocess": "dataset preprocessing",
    "train": "distributed training",
    "render": "cascade and rendering",
    "upscale": "cascade and rendering",
    "run": "end-to-end pipeline",
    "status": "end-to-end pipeline",
}


def _load(items: Sequence[str]) -> RunConfig:
    """YAML paths and key=value overrides, in the order given."""
    paths = [item for item in items if "=" not in item]
    overrides = [item for item in items if "=" in item]
    return load_config(paths, overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    sys.stdout.write(dump_config(cfg))
    print(f"# fingerprint: {fingerprint(cfg)}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from models.flops import forward_flops, parameter_count

    cfg = _load(args.config)
    d, m = cfg.data, cfg.model
    flops = forward_flops(m, d.frames, d.height, d.width, cfg.text.max_length)
    rows = [
        (
            "model",
            f"{m.kind}, width {m.width}, depth {m.depth}, heads {m.heads}, patch {tuple(m.patch_size)}",
        ),
        ("parameters", f"{parameter_count(m) / 1e6:.2f} M"),
        ("input", f"{d.frames}×{d.height}×{d.width} (T×H×W), {cfg.text.max_length} text tokens"),
        ("forward GFLOPs/sample", f"{flops.total / 1e9:.3f}"),
        *((f"  {name}", f"{value / 1e9:.3f}") for name, value in flops.as_dict().items() if name != "total"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved config as YAML with its fingerprint")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, in order")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("model-info", help="parameters and forward FLOPs of the configured model")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, in order")
    p.set_defaults(func=_cmd_model_info)
    for name, issue in NOT_YET.items():
        p = sub.add_parser(name, help=f"(not yet: lands with the {issue} issue)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=None, issue=issue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is None:
        print(
            f"pipeline {args.command}: not yet available — it lands with the {args.issue} issue.",
            file=sys.stderr,
        )
        return 3
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
