"""The ``pouta`` command line. It parses arguments and calls into pouta_core or the
orchestrator; heavy imports (torch models, Ray, MLflow) happen inside the subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pouta_core.config import PRESETS, Config, ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def _add_config_args(p: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"base preset (default: {default_preset}); a 'preset:' key in --config wins")
    p.add_argument("--config", metavar="FILE", help="YAML config file (over the preset)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key; repeatable")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, help="folder holding the data set")
    p.add_argument("--dataset", required=True, choices=["mvtec", "visa", "dagm", "folder"])
    p.add_argument("--category", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", help="on-disk cache of decoded, resized images")


def _load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    overrides = [*args.overrides, *extra]
    if args.config:
        return Config.from_yaml(args.config, overrides=overrides, preset=args.preset)
    return Config.from_preset(args.preset, overrides=overrides)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, allow_nan=True))


def _cmd_bench_model(args: argparse.Namespace) -> int:
    import torch

    from pouta_core.benchmark import bench_models, format_table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    extra = [f"image_size={args.image_size}"] if args.image_size else []
    cfg = _load_config(args, extra)
    result = bench_models(cfg, device=args.device, runs=args.runs, warmup=args.warmup,
                          progress=not args.json)
    if args.json:
        _print_json(result)
    else:
        print(format_table(result, device=args.device, image_size=cfg.image_size, runs=args.runs))
    return 0


def _cmd_bench_synthesis(args: argparse.Namespace) -> int:
    from pouta_core.benchmark import bench_synthesis

    cfg = Config.from_preset("paper", [f"image_size={args.image_size}"])
    result = bench_synthesis(cfg, n=args.samples, progress=not args.json)
    if args.json:
        _print_json(result)
    else:
        print(f"synthesis at {result['image_size']}px: {result['samples_per_second_per_core']:.1f} "
              f"samples/s per core ({result['samples']} samples in {result['seconds']:.2f} s)")
    return 0


def _cmd_bench_metrics(args: argparse.Namespace) -> int:
    from pouta_core.benchmark import bench_metrics

    result = bench_metrics(args.pixels)
    if args.json:
        _print_json(result)
    else:
        print(f"{result['pixels']:,} pixels: pouta_core.metrics {result['pouta_seconds']:.2f} s, "
              f"scikit-learn {result['sklearn_seconds']:.2f} s (x{result['speedup']:.1f}); "
              f"largest |difference| {result['max_abs_diff']:.2e}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pouta_core.data.demo import generate

    names = generate(args.out, categories=args.categories, image_size=args.image_size, seed=args.seed,
                     force=args.force)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)} (MVTec AD layout)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pouta_core import api

    cfg = _load_config(args)
    metrics = api.train(cfg, data_root=args.data_root, dataset=args.dataset, category=args.category,
                        out=args.out, device=args.device, texture_dir=args.texture_dir,
                        cache_dir=args.cache_dir, num_workers=args.num_workers, resume=not args.no_resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("image_", "pixel_")) and v == v}
    print(f"trained {args.category} -> {args.out}/checkpoint.pt  {shown}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pouta_core import api

    metrics = api.evaluate_checkpoint(args.checkpoint, data_root=args.data_root, dataset=args.dataset,
                                      category=args.category, device=args.device, cache_dir=args.cache_dir,
                                      progress=not args.json)
    if args.json:
        _print_json(metrics)
    else:
        for k, v in metrics.items():
            print(f"{k:14} {v:.4f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pouta_core import api

    results = api.predict_paths(args.checkpoint, args.paths, args.out, threshold=args.threshold,
                                save_maps=args.save_maps, device=args.device)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            print(f"{r['score']:.4f}  {'ANOMALOUS' if r['anomalous'] else 'ok':9}  {r['image']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pouta_core import api

    result = api.export(args.checkpoint, args.format, args.out)
    print(f"exported {args.format} to {args.out}; anomaly map matches PyTorch within "
          f"{result['max_abs_diff']:.1e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pouta", description="POUTA visual anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one category on this machine")
    _add_data_args(p)
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, config.yaml, metrics.json")
    p.add_argument("--texture-dir", help="anomaly source images (e.g. DTD); default: procedural, offline")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint already in --out")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a category's test split")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint.pt")
    _add_data_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="score images, write heat-map overlays")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="decision threshold (default: the stored one)")
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo-data", help="generate an offline demo data set (MVTec AD layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--categories", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate categories that exist")
    p.set_defaults(func=_cmd_demo_data)

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
    bs = bench_sub.add_parser("synthesis", help="synthesised images per second per core")
    bs.add_argument("--image-size", type=int, default=224)
    bs.add_argument("--samples", type=int, default=64)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=_cmd_bench_synthesis)
    bx = bench_sub.add_parser("metrics", help="metrics vs scikit-learn: seconds and difference")
    bx.add_argument("--pixels", type=int, default=10_000_000)
    bx.add_argument("--json", action="store_true")
    bx.set_defaults(func=_cmd_bench_metrics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "runs", 20) < 20:
        parser.error("--runs must be at least 20")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pouta_core.data.errors import DataError

    try:
        return args.func(args)
    except (*USER_ERRORS, DataError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"pouta: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
