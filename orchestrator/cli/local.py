"""One machine, no Ray, no MLflow (except ``--model`` names): ``train``, ``evaluate``,
``rescore``, ``predict``, ``export``, ``serve`` and ``demo-data``."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.args import (
    add_config_args,
    add_data_args,
    add_image_limit_arg,
    add_model_args,
    add_scoring_arg,
    add_selection_args,
    add_source_args,
    load_config,
)
from orchestrator.cli.console import print_json


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pouta_core.data.demo import generate

    names = generate(args.out, categories=args.categories, image_size=args.image_size, seed=args.seed,
                     force=args.force, difficulty=args.difficulty, n_test_good=args.test_good,
                     n_test_defect=args.test_defect)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)} (MVTec AD layout)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pouta_core import api

    cfg = load_config(args)
    metrics = api.train(cfg, data_root=args.data_root, dataset=args.dataset, category=args.category,
                        out=args.out, device=args.device, texture_dir=args.texture_dir,
                        cache_dir=args.cache_dir, num_workers=args.num_workers, resume=not args.no_resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) and v == v}
    print(f"trained {args.category} -> {args.out}/checkpoint.pt  {shown}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestrator.tracking.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        metrics = api.evaluate_checkpoint(checkpoint, data_root=args.data_root, dataset=args.dataset,
                                          category=args.category, device=args.device, cache_dir=args.cache_dir,
                                          split=args.split, progress=not args.json, by_defect=args.by_defect,
                                          scoring=args.scoring)
    if args.json:
        print_json(metrics)
    elif args.by_defect:
        keys = ["image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro"]
        print(f"{'defect':14}" + "".join(f"{k:>13}" for k in keys))
        for name, m in {"all": metrics["all"], **metrics["by_defect"]}.items():
            print(f"{name:14}" + "".join(f"{m[k]:>13.4f}" for k in keys))
    else:
        for k, v in metrics.items():
            print(f"{k:14} {v:.4f}")
    return 0


def _cmd_rescore(args: argparse.Namespace) -> int:
    from orchestrator.tracking.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        metrics = api.rescore(checkpoint, args.out, scoring=args.scoring, data_root=args.data_root,
                              dataset=args.dataset, category=args.category, device=args.device,
                              cache_dir=args.cache_dir, progress=not args.json)
    if args.json:
        print_json(metrics)
    else:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) and v == v}
        print(f"re-scored {args.category} -> {args.out}/checkpoint.pt  {shown}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.tracking.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        result = api.predict_paths(checkpoint, args.paths, args.out, threshold=args.threshold,
                                   save_maps=args.save_maps, device=args.device)
    if args.json:
        print_json({"decision": result.decision, "scored": result.scored,
                    "failed": [{"image": p, "error": e} for p, e in result.failed]})
    else:
        print(f"pouta: {result.decision}", file=sys.stderr)
        for r in result.scored:
            print(f"{r['score']:.4f}  {'ANOMALOUS' if r['anomalous'] else 'ok':9}  {r['image']}")
    if result.failed:
        print(f"pouta: {len(result.failed)} of {len(result.failed) + len(result.scored)} images could not be "
              "read (the others were scored):", file=sys.stderr)
        for path, reason in result.failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.tracking.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        result = api.export(checkpoint, args.format, args.out)
    print(f"exported {args.format} to {args.out}; anomaly map matches PyTorch within "
          f"{result['max_abs_diff']:.1e}, image score within {result['score_max_abs_diff']:.1e}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.commands.serve import serve

    return serve(args.checkpoint, tracking_uri=args.tracking_uri, host=args.host, port=args.port,
                 workers=args.workers, timeout=args.timeout, start_timeout=args.start_timeout)


def add_local_commands(sub) -> None:
    """One machine, no Ray, no MLflow (except --model names): train ... demo-data."""
    p = sub.add_parser("train", help="train one category on this machine")
    add_data_args(p)
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, config.yaml, metrics.json")
    add_source_args(p)
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint already in --out")
    add_selection_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a category's test (or validation) split")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test (default) or val: the validation images the checkpoint was chosen on, "
                   "split as its config says")
    p.add_argument("--by-defect", action="store_true",
                   help="also the metrics of each defect type, scored with the split's good images")
    add_scoring_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("rescore", help="keep another scoring of a trained model: a new run folder, "
                       "same weights, normalisation and threshold computed again on validation")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="the new run folder")
    add_scoring_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rescore)

    p = sub.add_parser("predict", help="score images, write heat-map overlays")
    add_model_args(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float,
                   help="decision threshold (default: the stored one, set on validation by the run's threshold_policy)")
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    add_image_limit_arg(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch")
    add_model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="serve a model over HTTP with MLflow's scoring server: images in, "
                       "score, decision and anomaly map out")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, "
                   "behind an authenticating proxy)")
    p.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes, each with its own model copy")
    p.add_argument("--timeout", type=int, default=60, help="seconds one request may take (default 60)")
    p.add_argument("--start-timeout", type=float, default=180,
                   help="seconds to wait for the server to answer before giving up (default 180)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo-data", help="generate an offline demo data set (MVTec AD layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--categories", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate categories that exist")
    p.add_argument("--difficulty", choices=["easy", "hard", "photo"], default="easy",
                   help="easy: tiles, pills, weave, screws with foreign-content defects (the demo); hard: wood, "
                   "concrete, fabric, board with warps, blur, colour shifts, faint stains, thin cracks, misplaced "
                   "and missing parts; photo: grass, gravel, brick cut from real photographs (scikit-image's "
                   "bundled files) with the hard defects (docs/experiments.md)")
    p.add_argument("--test-good", type=int, default=12, help="good test images per category")
    p.add_argument("--test-defect", type=int, default=8, help="test images per category and defect type")
    p.set_defaults(func=_cmd_demo_data)
