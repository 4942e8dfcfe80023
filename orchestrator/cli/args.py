"""Argument groups shared by the commands (config, data, model, selection, cluster), and
what they become: a :class:`~pouta_core.config.Config` and a :class:`~orchestrator.plan.Plan`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pouta_core.config import PRESETS, Config, ConfigError


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"base preset (default: {default_preset}); a 'preset:' key in --config wins")
    p.add_argument("--config", metavar="FILE", help="YAML config file (over the preset)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key; repeatable")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", required=True, help="folder holding the data set")
    p.add_argument("--dataset", required=True, choices=["mvtec", "visa", "dagm", "folder"])
    p.add_argument("--category", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", help="on-disk cache of decoded, resized images")
    add_image_limit_arg(p)


def add_image_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="largest image decoded, in pixels (default: Pillow's 89,478,485); bigger files are "
                   "refused as possible decompression bombs; raise it for big scans")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="checkpoint", required=True, metavar="MODEL",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a run folder, a checkpoint.pt "
                   "or a Ray trial folder")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI, "
                   "else ./mlflow-data)")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-split", choices=["auto", "from_test", "synthetic", "none"],
                   help="images every choice is made on (config key val_split; default auto: from_test "
                   "when the test split has defect images, else synthetic); none selects on the test split")
    p.add_argument("--val-ratio", type=float, help="share going to validation (config key val_ratio; default 0.3)")


def add_scoring_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="scoring", metavar="KEY=VALUE", action="append", default=[],
                   help="read the trained model another way, without retraining: a scoring key "
                   "(map_heads_weight, image_score, image_score_topk, image_score_pool, score_norm); repeatable")


def add_cluster_args(p: argparse.ArgumentParser, default_name: str | None) -> None:
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", required=True, choices=["mvtec", "visa", "dagm", "folder"])
    p.add_argument("--categories", default="all", help="'all' or a comma-separated list")
    p.add_argument("--workers-per-category", type=int, default=1, help="Ray Train workers per run (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs of each worker; all but one run its data loader (default: with --gpus-per-worker, "
                        "a GPU node's CPUs per GPU less one, read from the cluster; else 1)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="reruns of an errored trial from its last checkpoint before it counts as "
                        "failed; a multi-worker trial also restarts its worker group that often (default 2)")
    p.add_argument("--max-concurrent", type=int, default=0, help="most runs at once (0: as resources allow)")
    p.add_argument("--storage-path", default="ray-results",
                   help="Ray results and checkpoints: a directory; on a multi-node cluster one every node mounts "
                        "(NFS, a ReadWriteMany volume); URIs (s3://) are refused")
    p.add_argument("--name", default=default_name, help="stable experiment name: rerunning it resumes")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow-data)")
    p.add_argument("--experiment", default="pouta", help="MLflow experiment name")
    p.add_argument("--category-set", dest="category_sets", metavar="CATEGORY:KEY=VALUE", action="append",
                   default=[], help="override one config key for one category only (e.g. "
                   "pills:foreground_threshold=0.3 for an object among textures); repeatable")
    p.add_argument("--pending-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop when a trial's workers wait this long for resources the cluster does not free "
                   "(default 600)")
    p.add_argument("--mlflow-wait", type=float, default=600.0, metavar="SECONDS",
                   help="when the trials are done and MLflow is unreachable, wait this long for it to take the "
                   "records kept meanwhile, then exit 4 without registering (default 600)")
    p.add_argument("--ray-address", help="Ray cluster to join (host:port of its GCS; default: $RAY_ADDRESS, "
                   "else an in-process Ray started for this command)")
    add_source_args(p)
    p.add_argument("--cache-dir")
    add_image_limit_arg(p)
    add_selection_args(p)


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--texture-dir", help="anomaly source images (the paper's: DTD's images folder); default: "
                   "procedural fractal noise, offline, with a notice")
    p.add_argument("--procedural-source", action="store_true",
                   help="use procedural noise as the anomaly source on purpose (no notice)")


def source_notice(args: argparse.Namespace, config: Config) -> None:
    """Say, once on stderr, when procedural noise stands in for a texture folder."""
    from pouta_core.synthesis.sources import procedural_notice

    line = None if getattr(args, "procedural_source", False) else procedural_notice(args.texture_dir,
                                                                                 config.self_source_ratio)
    if line:
        print(f"pouta: {line}", file=sys.stderr, flush=True)


def load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    if getattr(args, "texture_dir", None) and getattr(args, "procedural_source", False):
        raise ConfigError("--texture-dir and --procedural-source: choose one anomaly source")
    overrides = [*args.overrides, *extra]
    # --val-split / --val-ratio are config keys, so they travel with the run and its checkpoint.
    for key in ("val_split", "val_ratio"):
        if getattr(args, key, None) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    if args.config:
        return Config.from_yaml(args.config, overrides=overrides, preset=args.preset)
    return Config.from_preset(args.preset, overrides=overrides)


def preset_of(args: argparse.Namespace) -> str:
    """The preset a command's config starts from: a --config file's ``preset:`` key, else
    --preset (what ``load_config`` applies; the file was read and checked there)."""
    import yaml

    if args.config:
        data = yaml.safe_load(Path(args.config).read_text())
        if isinstance(data, dict) and data.get("preset"):
            return str(data["preset"])
    return args.preset


def make_plan(args: argparse.Namespace, name: str, metric: str = "pixel_ap", mode: str = "max"):
    from orchestrator.plan import Plan, parse_category_sets, resolve_categories, selection_metric
    from orchestrator.spec import DataSpec, Resources

    for flag in ("workers_per_category", "cpus_per_worker", "pending_timeout"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    if args.mlflow_wait < 0:
        raise ConfigError("--mlflow-wait must be >= 0")
    if args.max_failures < 0:
        raise ConfigError("--max-failures must be >= 0")
    categories = resolve_categories(args.data_root, args.dataset, args.categories)
    base = load_config(args)
    return Plan(data=DataSpec.of(args.data_root, args.dataset, args.texture_dir, args.cache_dir,
                                 args.max_image_pixels),
                categories=categories, base=base, run_name=name,
                resources=Resources(workers=args.workers_per_category, cpus_per_worker=args.cpus_per_worker or 1.0,
                                    gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures,
                                    size_cpus=args.cpus_per_worker is None),
                per_category=parse_category_sets(args.category_sets, categories, base),
                storage_path=args.storage_path, tracking_uri=args.tracking_uri, mlflow_experiment=args.experiment,
                max_concurrent=args.max_concurrent, ray_address=args.ray_address,
                pending_timeout=args.pending_timeout, mlflow_wait=args.mlflow_wait, metric=selection_metric(metric),
                mode=mode, verbose=args.verbose, preset=preset_of(args))
