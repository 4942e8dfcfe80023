"""The ``pouta`` command line. It parses arguments and calls into pouta_core or the
orchestrator; heavy imports (Ray, MLflow) happen inside the subcommands that need them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pouta_core.config import PRESETS, Config, ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="base preset (default: paper); a 'preset:' key in --config wins")
    p.add_argument("--config", metavar="FILE", help="YAML config file (overrides the preset)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key; repeatable")


def _load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    overrides = [*args.overrides, *extra]
    if args.config:
        return Config.from_yaml(args.config, overrides=overrides, preset=args.preset)
    return Config.from_preset(args.preset, overrides=overrides)


def _cmd_bench_model(args: argparse.Namespace) -> int:
    import torch

    from pouta_core.benchmark import bench_models, format_table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pouta bench model: --device cuda requested but CUDA is not available")
    extra = [f"image_size={args.image_size}"] if args.image_size else []
    cfg = _load_config(args, extra)
    result = bench_models(cfg, device=args.device, runs=args.runs, warmup=args.warmup,
                          progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result, device=args.device, image_size=cfg.image_size, runs=args.runs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pouta", description="POUTA anomaly detection")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bm = bench_sub.add_parser("model", help="POUTA vs vanilla: parameters, GFLOPs, latency")
    _add_config_args(bm)
    bm.add_argument("--image-size", type=int, default=None, help="override image_size")
    bm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bm.add_argument("--runs", type=int, default=20, help="timed runs per model (>= 20)")
    bm.add_argument("--warmup", type=int, default=3, help="untimed runs per model first")
    bm.add_argument("--json", action="store_true", help="print one JSON object")
    bm.set_defaults(func=_cmd_bench_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "runs", 20) < 20:
        parser.error("--runs must be at least 20")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pouta: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
