"""The ``pouta`` command line. It parses arguments and calls into pouta_core or the
orchestrator; heavy imports (torch models, Ray, MLflow) happen inside the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pouta_core.config import PRESETS, Config, ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)
# What finishes an interrupted command: its experiment state and MLflow runs are kept.
RESUME_HINTS = {"sweep": "rerun the same command with --resume",
                "launch": "rerun the same command to resume it",
                "retrain": "rerun the same command to resume it",
                "train": "rerun the same command to resume from the last checkpoint"}


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
    _add_image_limit_arg(p)


def _add_image_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="largest image decoded, in pixels (default: Pillow's 89,478,485); bigger files are "
                   "refused as possible decompression bombs; raise it for big scans")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="checkpoint", required=True, metavar="MODEL",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a run folder, a checkpoint.pt "
                   "or a Ray trial folder")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI, "
                   "else ./mlflow-data)")


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-split", choices=["auto", "from_test", "synthetic", "none"],
                   help="images every choice is made on (config key val_split; default auto: from_test "
                   "when the test split has defect images, else synthetic); none selects on the test split")
    p.add_argument("--val-ratio", type=float, help="share going to validation (config key val_ratio; default 0.3)")


def _load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    overrides = [*args.overrides, *extra]
    # --val-split / --val-ratio are config keys, so they travel with the run and its checkpoint.
    for key in ("val_split", "val_ratio"):
        if getattr(args, key, None) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
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


def _cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from pouta_core.benchmark import bench_train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    if args.steps < 1 or args.num_workers < 0:
        raise ConfigError("--steps must be >= 1 and --num-workers >= 0")
    extra = [f"image_size={args.image_size}"] if args.image_size else []
    r = bench_train(_load_config(args, extra), device=args.device, steps=args.steps, num_workers=args.num_workers,
                    progress=not args.json)
    if args.json:
        _print_json(r)
        return 0
    print(f"{r['device']}, {r['image_size']} px, batch {r['batch_size']}, {r['num_workers']} loader workers: "
          f"input {r['input_samples_per_s']:.1f} samples/s, model step {r['model_step_samples_per_s']:.1f}, "
          f"whole step {r['train_step_samples_per_s']:.1f}; input/model x{r['input_to_model_ratio']:.1f}, "
          f"waiting for input {r['waiting_for_input_share']:.0%} of the step")
    print(", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in r["targets"].items()))
    return 0


def _cmd_bench_synthesis(args: argparse.Namespace) -> int:
    from orchestrator.peers import anomalib_rate
    from pouta_core.benchmark import bench_synthesis
    from pouta_core.synthesis import TextureFolder

    if args.samples < 1 or args.rounds < 1 or args.batch_size < 1:
        raise ConfigError("--samples, --rounds and --batch-size must be >= 1")
    cfg = Config.from_preset("paper", [f"image_size={args.image_size}", f"clean_ratio={args.clean_ratio}"])
    textures = TextureFolder(args.texture_dir, args.image_size) if args.texture_dir else None
    peer = anomalib_rate(args.anomalib_python, image_size=args.image_size, samples=args.samples,
                         batch_size=args.batch_size, texture_dir=args.texture_dir,
                         clean_ratio=args.clean_ratio) if args.compare_anomalib else None
    r = bench_synthesis(cfg, n=args.samples, batch_size=args.batch_size, textures=textures, rounds=args.rounds,
                        peer=peer, progress=not args.json)
    if args.json:
        _print_json(r)
        return 0
    source = f"textures from {args.texture_dir}" if textures is not None else "procedural sources"
    print(f"synthesis at {r['image_size']} px, {source}, clean_ratio {r['clean_ratio']}, one core, medians of "
          f"{r['rounds']} round(s): batched {r['batched_images_per_s_per_core']:.1f} images/s, per-sample "
          f"{r['per_sample_images_per_s_per_core']:.1f} (x{r['batched_to_per_sample']:.1f})")
    if peer is not None:
        print(f"anomalib PerlinAnomalyGenerator {r['anomalib_images_per_s_per_core']:.1f} images/s: batched is "
              f"x{r['batched_to_anomalib']:.1f} ({'ok' if r['targets']['batched>=3x anomalib'] else 'MISSED'}: "
              "target x3)")
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


def _cmd_bench_orchestration(args: argparse.Namespace) -> int:
    from orchestrator.bench import bench_orchestration

    if args.trials < 1 or args.slots < 1:
        raise ConfigError("--trials and --slots must be >= 1")
    if args.epoch_floor_s < 0:
        raise ConfigError(f"--epoch-floor-s must be >= 0, got {args.epoch_floor_s}")
    # With --json, stdout is the figures only: Tune's progress tables go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = bench_orchestration(args.categories, args.trials, args.slots, args.work, args.epoch_floor_s)
    if args.json:
        _print_json(result)
    else:
        r = result
        print(f"{args.categories} categories x {args.trials} trials, {args.slots} slots, epochs of at least "
              f"{args.epoch_floor_s:g} s (simulated accelerator): concurrent "
              f"{r['concurrent_wall_s']:.0f} s, serial {r['serial_wall_s']:.0f} s (x{r['wall_ratio']:.2f}); "
              f"training {result['training_share_of_slot_time']:.0%} of slot time; per-trial overhead "
              f"{result['trial_overhead_s_median']:.1f} s (start {result['trial_startup_overhead_s_median']:.1f}, "
              f"end {result['trial_teardown_overhead_s_median']:.1f})")
        print(", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in result["targets"].items()))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pouta_core.data.demo import generate

    names = generate(args.out, categories=args.categories, image_size=args.image_size, seed=args.seed,
                     force=args.force, difficulty=args.difficulty, n_test_good=args.test_good,
                     n_test_defect=args.test_defect)
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)} (MVTec AD layout)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pouta_core import api

    cfg = _load_config(args)
    metrics = api.train(cfg, data_root=args.data_root, dataset=args.dataset, category=args.category,
                        out=args.out, device=args.device, texture_dir=args.texture_dir,
                        cache_dir=args.cache_dir, num_workers=args.num_workers, resume=not args.no_resume)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) and v == v}
    print(f"trained {args.category} -> {args.out}/checkpoint.pt  {shown}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestrator.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        metrics = api.evaluate_checkpoint(checkpoint, data_root=args.data_root, dataset=args.dataset,
                                          category=args.category, device=args.device, cache_dir=args.cache_dir,
                                          split=args.split, progress=not args.json, by_defect=args.by_defect,
                                          scoring=args.scoring)
    if args.json:
        _print_json(metrics)
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
    from orchestrator.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        metrics = api.rescore(checkpoint, args.out, scoring=args.scoring, data_root=args.data_root,
                              dataset=args.dataset, category=args.category, device=args.device,
                              cache_dir=args.cache_dir, progress=not args.json)
    if args.json:
        _print_json(metrics)
    else:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_", "test_")) and v == v}
        print(f"re-scored {args.category} -> {args.out}/checkpoint.pt  {shown}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        result = api.predict_paths(checkpoint, args.paths, args.out, threshold=args.threshold,
                                   save_maps=args.save_maps, device=args.device)
    if args.json:
        _print_json({"scored": result.scored, "failed": [{"image": p, "error": e} for p, e in result.failed]})
    else:
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
    from orchestrator.models import resolved
    from pouta_core import api

    with resolved(args.checkpoint, args.tracking_uri) as checkpoint:
        result = api.export(checkpoint, args.format, args.out)
    print(f"exported {args.format} to {args.out}; anomaly map matches PyTorch within "
          f"{result['max_abs_diff']:.1e}, image score within {result['score_max_abs_diff']:.1e}")
    return 0


def _add_scoring_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="scoring", metavar="KEY=VALUE", action="append", default=[],
                   help="read the trained model another way, without retraining: a scoring key "
                   "(map_heads_weight, image_score, image_score_topk, score_norm); repeatable")


def _add_cluster_args(p: argparse.ArgumentParser, default_name: str | None) -> None:
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", required=True, choices=["mvtec", "visa", "dagm", "folder"])
    p.add_argument("--categories", default="all", help="'all' or a comma-separated list")
    p.add_argument("--workers-per-category", type=int, default=1, help="Ray Train workers per run (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=2,
                   help="restarts of a multi-worker run's worker group before the run fails (default 2)")
    p.add_argument("--max-concurrent", type=int, default=0, help="most runs at once (0: as resources allow)")
    p.add_argument("--storage-path", default="ray-results",
                   help="Ray results and checkpoints; shared storage (NFS, S3) on a multi-node cluster")
    p.add_argument("--name", default=default_name, help="stable experiment name: rerunning it resumes")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow-data)")
    p.add_argument("--experiment", default="pouta", help="MLflow experiment name")
    p.add_argument("--category-set", dest="category_sets", metavar="CATEGORY:KEY=VALUE", action="append",
                   default=[], help="override one config key for one category only (e.g. "
                   "pills:foreground_threshold=0.3 for an object among textures); repeatable")
    p.add_argument("--pending-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop when a trial's workers wait this long for resources the cluster does not free "
                   "(default 600)")
    p.add_argument("--ray-address", help="Ray cluster to join (host:port of its GCS; default: $RAY_ADDRESS, "
                   "else an in-process Ray started for this command)")
    p.add_argument("--texture-dir")
    p.add_argument("--cache-dir")
    _add_image_limit_arg(p)
    _add_selection_args(p)


def _plan(args: argparse.Namespace, name: str, metric: str = "pixel_ap", mode: str = "max"):
    from orchestrator.experiment import Plan, parse_category_sets, resolve_categories
    from orchestrator.spec import DataSpec, Resources

    for flag in ("workers_per_category", "cpus_per_worker", "pending_timeout"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    if args.max_failures < 0:
        raise ConfigError("--max-failures must be >= 0")
    categories = resolve_categories(args.data_root, args.dataset, args.categories)
    base = _load_config(args)
    return Plan(data=DataSpec.of(args.data_root, args.dataset, args.texture_dir, args.cache_dir,
                                 args.max_image_pixels),
                categories=categories, base=base, run_name=name,
                resources=Resources(workers=args.workers_per_category, cpus_per_worker=args.cpus_per_worker,
                                    gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures),
                per_category=parse_category_sets(args.category_sets, categories, base),
                storage_path=args.storage_path, tracking_uri=args.tracking_uri, mlflow_experiment=args.experiment,
                max_concurrent=args.max_concurrent, ray_address=args.ray_address,
                pending_timeout=args.pending_timeout, metric=metric, mode=mode, verbose=args.verbose)


def _category_sets_note(plan) -> str:
    return "".join(f"; {c}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                   for c, values in plan.per_category.items())


def _print_summary(summary: dict, keys: list[str]) -> None:
    """One row per category: validation (chosen on) and test (only reported) side by side."""
    print(f"{'category':14}" + "".join(f"{k:>17}" for k in keys) + "  model")
    no_test = []
    for category, e in summary.items():
        if "error" in e:
            print(f"{category:14}  FAILED: {e['error']}")
            continue
        best = e.get("best", e)
        if all(best.get(k) is None for k in keys if k.startswith("test_")):
            no_test.append(category)
        vals = "".join(f"{_num(best.get(k)):>17}" for k in keys)
        print(f"{category:14}{vals}  {e.get('registered_model', '')} v{e.get('version', '?')} (challenger)")
    if no_test:
        print(f"no test metrics for {', '.join(no_test)}: no labelled test images (validation is synthetic)")


def _num(v) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def _selection_warning(plan) -> None:
    if any(plan.config_for(c).val_split == "none" for c in plan.categories):
        print("WARNING: --val-split none: every choice was made on the test split, so these test metrics are "
              "optimistic", file=sys.stderr)


def _pouta_command() -> str:
    """How to run ``pouta`` again from any shell: the console script beside this Python."""
    script = Path(sys.executable).parent / "pouta"
    return str(script) if script.is_file() else f"{sys.executable} -m orchestrator.cli"


def _mlflow_hint(args: argparse.Namespace) -> None:
    from orchestrator import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///"):
        print(f"MLflow UI: {_pouta_command()} ui --tracking-uri {uri}")
    else:
        print(f"MLflow UI: open {uri} in a browser")


def _cmd_ui(args: argparse.Namespace) -> int:
    """``mlflow ui`` on the store the other commands use, on 127.0.0.1 unless told otherwise."""
    from orchestrator import tracking
    from orchestrator.models import existing_store

    uri = existing_store(args.tracking_uri)
    if not uri.startswith(("sqlite:///", "postgresql", "mysql")):
        raise ConfigError(f"{uri} is a tracking server already: open it in a browser")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    root = tracking.artifact_root(uri)
    if root:
        argv += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C stops it)", flush=True)
    os.execv(argv[0], argv)


def _cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.experiment import SUMMARY_METRICS, both_splits
    from orchestrator.launch import run_launch

    plan = _plan(args, args.name or f"launch-{args.dataset}")
    if args.dry_run:
        print(f"would train {', '.join(plan.categories)} with {plan.resources.workers} worker(s) each"
              + _category_sets_note(plan))
        return 0
    summary = run_launch(plan, resume=True)
    _print_summary(summary, both_splits(SUMMARY_METRICS))
    _selection_warning(plan)
    _mlflow_hint(args)
    return 1 if any("error" in e for e in summary.values()) else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import search_spaces
    from orchestrator import report
    from orchestrator.experiment import both_splits
    from orchestrator.progress import short
    from orchestrator.sweep import check_category_sets, parse_objectives, run_sweep

    base = _load_config(args)
    space = search_spaces.load(args.space, base)
    objectives = parse_objectives(args.objectives, args.metric, args.mode)
    plan = _plan(args, args.name or f"sweep-{space.path.stem}-{args.dataset}", objectives[0][0], objectives[0][1])
    check_category_sets(plan, space)
    best_out = args.best_out or str(Path(args.storage_path) / f"{plan.run_name}-best.yaml")
    if args.dry_run:
        print(f"would sweep {space.path.name} ({', '.join(space.keys)}) on {', '.join(plan.categories)}, "
              f"{args.num_samples} trial(s) each" + _category_sets_note(plan))
        return 0
    summary = run_sweep(plan, space, num_samples=args.num_samples, scheduler=args.scheduler,
                        study_storage=args.study_storage, resume=args.resume, objectives=objectives,
                        best_out=best_out)
    keys = both_splits([k for k, _ in objectives] + ["image_auroc", "pixel_auroc", "pixel_ap"])
    if space.has_grid:
        _print_grid(summary, space, keys)
    _print_summary(summary, keys)
    _selection_warning(plan)
    for category, e in summary.items():
        if "config" in e:
            changed = " ".join(f"{k}={short(e['config'][k])}" for k in space.keys)
            print(f"best {category}: {changed}")
        for point in e.get("pareto", []):
            print(f"pareto {category}: " + ", ".join(f"{k}={point[k]:.4f}" for k, _ in objectives))
    print(f"best configs written to {best_out}; report (trials table, plots) in "
          f"{report.folder(Path(best_out).parent, plan.run_name)} and on the MLflow parent run")
    _mlflow_hint(args)
    return 1 if any("error" in e for e in summary.values()) else 0


def _print_grid(summary: dict, space, keys: list[str]) -> None:
    from orchestrator.spec import SAMPLED

    dims = [d.key for d in space.dimensions if d.distribution == "grid"]
    print("  ".join(f"{d:>12}" for d in ["category", *dims]) + "".join(f"{k:>17}" for k in keys))
    for category, e in summary.items():
        for row in e.get("trials", []):
            if "error" in row:
                continue
            sampled = row["config"].get(SAMPLED, {})
            print("  ".join(f"{str(v):>12}" for v in [category, *[sampled.get(d) for d in dims]])
                  + "".join(f"{_num(row.get(k)):>17}" for k in keys))


def _cmd_retrain(args: argparse.Namespace) -> int:
    from orchestrator.experiment import selection_metric
    from orchestrator.retrain import Gate, run_retrain
    from pouta_core.config import parse_overrides

    gate = Gate(metric=args.metric, margin=args.promote_margin, confidence=args.confidence,
                resamples=args.bootstrap_resamples)
    plan = _plan(args, args.name or f"retrain-{args.dataset}", selection_metric(args.metric), "max")
    if args.dry_run:
        print(f"would check {', '.join(plan.categories)} for changed data and retrain with params from "
              f"{args.params_from}")
        return 0
    summary = run_retrain(plan, params_from=args.params_from, gate=gate, force=args.force,
                          overrides=parse_overrides(args.overrides))
    for category, e in summary.items():
        detail = ""
        if "challenger" in e:
            detail = f"  challenger {e['metric']}={e['challenger']:.4f} (v{e['version']}), champion "
            if e["champion"] is None:
                detail += "none"
            else:
                detail += (f"{e['champion']:.4f} (v{e['champion_version']}); difference 95% interval "
                           f"[{e['low']:+.4f}, {e['high']:+.4f}], P(challenger better) {e['p_better']:.3f}")
        elif "error" in e:
            detail = f"  {e['error']}"
        print(f"{category:14} {e['status']}{detail}")
    failed = [c for c, e in summary.items() if e["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    _selection_warning(plan)
    _mlflow_hint(args)
    return 1 if failed else 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.models import existing_store

    store = existing_store(args.tracking_uri)     # never creates a store it then searches in vain
    try:
        tracking.promote(MlflowClient(store), args.model, args.version, tracking.CHAMPION)
    except Exception as exc:  # MlflowException for an unknown model or version
        raise ConfigError(f"cannot promote {args.model} version {args.version} in {store}: "
                          f"{str(exc).splitlines()[0]}") from None
    print(f"{args.model}: champion -> version {args.version}")
    return 0


def _kill_open_runs() -> None:
    tracking = sys.modules.get("orchestrator.tracking")   # loaded only by commands that track
    if tracking is not None:
        tracking.kill_open_runs()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pouta", description="POUTA visual anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; Tune's tables and Ray's worker output on the console")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_local_commands(sub)
    _add_cluster_commands(sub)
    _add_bench_commands(sub.add_parser("bench", help="benchmarks"))
    return parser


def _add_local_commands(sub) -> None:
    """One machine, no Ray, no MLflow (except --model names): train ... demo-data."""
    p = sub.add_parser("train", help="train one category on this machine")
    _add_data_args(p)
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, config.yaml, metrics.json")
    p.add_argument("--texture-dir", help="anomaly source images (e.g. DTD); default: procedural, offline")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint already in --out")
    _add_selection_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a category's test (or validation) split")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test (default) or val: the validation images the checkpoint was chosen on, "
                   "split as its config says")
    p.add_argument("--by-defect", action="store_true",
                   help="also the metrics of each defect type, scored with the split's good images")
    _add_scoring_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("rescore", help="keep another scoring of a trained model: a new run folder, "
                       "same weights, normalisation and threshold computed again on validation")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="the new run folder")
    _add_scoring_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rescore)

    p = sub.add_parser("predict", help="score images, write heat-map overlays")
    _add_model_args(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="decision threshold (default: the stored one)")
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    _add_image_limit_arg(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch")
    _add_model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_export)

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


def _add_cluster_commands(sub) -> None:
    """On Ray, tracked in MLflow: launch, sweep, retrain; and the registry: ui, promote."""
    p = sub.add_parser("launch", help="train every category on Ray (in-process or a cluster)")
    _add_cluster_args(p, None)
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="check the arguments and data, run nothing")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna search per category, tracked in MLflow")
    p.add_argument("--space", required=True, help="search space YAML (or a bundled name: mss_lambdas, ...)")
    _add_cluster_args(p, None)
    _add_config_args(p)
    p.add_argument("--num-samples", type=int, default=8, help="trials per category")
    p.add_argument("--metric", default="pixel_ap")
    p.add_argument("--mode", default="max", choices=["max", "min"])
    p.add_argument("--scheduler", choices=["asha", "none"], help="default: asha (none with --objectives)")
    p.add_argument("--study-storage", help="Optuna RDB URL (default: sqlite in --storage-path)")
    p.add_argument("--resume", action="store_true", help="continue the experiment and studies of --name")
    p.add_argument("--objectives", help="multi-objective, e.g. pixel_ap:max,latency_ms:min (Pareto front)")
    p.add_argument("--best-out", help="YAML of the best config per category (default: in --storage-path)")
    p.add_argument("--dry-run", action="store_true", help="check the space, arguments and data, run nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("retrain", help="retrain categories whose data changed; promote only if better")
    _add_cluster_args(p, None)
    _add_config_args(p)
    p.add_argument("--params-from", default="best",
                   help="best (best finished run), champion (the champion's run) or a YAML file from sweep")
    p.add_argument("--promote-margin", type=float, default=0.005,
                   help="the challenger must beat the champion's validation metric by more than this")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="and be better in at least this share of paired bootstrap resamples of the images")
    p.add_argument("--bootstrap-resamples", type=int, default=1000)
    p.add_argument("--metric", default="pixel_ap", choices=["pixel_ap", "pixel_auroc", "image_auroc"],
                   help="validation metric of the gate and of --params-from best")
    p.add_argument("--force", action="store_true", help="retrain every category, changed or not")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and data, run nothing")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("ui", help="the MLflow UI on this project's tracking store (127.0.0.1 by default)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow-data")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("promote", help="move the champion alias to a registered model version")
    p.add_argument("--model", required=True, help="registered model, e.g. pouta-mvtec-bottle")
    p.add_argument("--version", required=True)
    p.add_argument("--tracking-uri")
    p.set_defaults(func=_cmd_promote)


def _add_bench_commands(bench: argparse.ArgumentParser) -> None:
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bm = bench_sub.add_parser("model", help="POUTA vs vanilla: parameters, GFLOPs, latency")
    _add_config_args(bm)
    bm.add_argument("--image-size", type=int, default=None, help="override image_size")
    bm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bm.add_argument("--runs", type=int, default=20, help="timed runs per model (>= 20)")
    bm.add_argument("--warmup", type=int, default=3, help="untimed runs per model first")
    bm.add_argument("--json", action="store_true", help="print one JSON object")
    bm.set_defaults(func=_cmd_bench_model)
    bt = bench_sub.add_parser("train", help="training throughput: input pipeline, model step, whole step, "
                              "share of the step spent waiting for input")
    _add_config_args(bt)
    bt.add_argument("--image-size", type=int, default=None, help="override image_size")
    bt.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bt.add_argument("--steps", type=int, default=5, help="timed batches per measurement (default 5)")
    bt.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=_cmd_bench_train)
    bs = bench_sub.add_parser("synthesis", help="synthesised images per second per core")
    bs.add_argument("--image-size", type=int, default=224)
    bs.add_argument("--samples", type=int, default=64, help="images per measurement (default 64)")
    bs.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    bs.add_argument("--clean-ratio", type=float, default=0.0,
                    help="share of images left clean, for both generators (default 0: every image gets an anomaly)")
    bs.add_argument("--texture-dir", help="anomaly source images (DTD or any folder); default: procedural sources "
                    "(anomalib: its Perlin noise)")
    bs.add_argument("--rounds", type=int, default=3, help="measurements in turns; medians are printed (default 3)")
    bs.add_argument("--compare-anomalib", action="store_true",
                    help="also time anomalib's PerlinAnomalyGenerator, in its own environment "
                    "(make bench-anomalib-env)")
    bs.add_argument("--anomalib-python", default=".venv-anomalib/bin/python",
                    help="the Python of that environment (default .venv-anomalib/bin/python)")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=_cmd_bench_synthesis)
    bo = bench_sub.add_parser("orchestration", help="concurrent vs one-category-after-another sweeps, "
                              "per-trial overhead, on an in-process Ray with more logical CPUs than cores")
    bo.add_argument("--categories", type=int, default=4, choices=range(1, 5), metavar="K", help="1 to 4 (default 4)")
    bo.add_argument("--trials", type=int, default=4, help="trials per category (default 4)")
    bo.add_argument("--slots", type=int, default=8, help="logical CPUs = concurrent trials (default 8)")
    bo.add_argument("--epoch-floor-s", type=float, default=3.0,
                    help="simulated accelerator: each epoch lasts at least this long, waiting rather "
                         "than computing (default 3; 0 = purely CPU-bound trials sharing this machine's cores)")
    bo.add_argument("--work", help="folder for data, Ray results and MLflow (default: a new temp folder)")
    bo.add_argument("--json", action="store_true")
    bo.set_defaults(func=_cmd_bench_orchestration)
    bx = bench_sub.add_parser("metrics", help="metrics vs scikit-learn: seconds and difference")
    bx.add_argument("--pixels", type=int, default=10_000_000)
    bx.add_argument("--json", action="store_true")
    bx.set_defaults(func=_cmd_bench_metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "runs", 20) < 20:
        parser.error("--runs must be at least 20")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Tune's and Train's advice ("snapshotting may become a bottleneck", resource hints
        # the watchdog turns into its own message) stays in Ray's logs.
        for name in ("ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)
    from orchestrator import interrupts
    from orchestrator.errors import ClusterStalled
    from pouta_core.data.errors import DataError

    try:
        if getattr(args, "max_image_pixels", None) is not None:
            from pouta_core.data.images import set_max_image_pixels

            set_max_image_pixels(args.max_image_pixels)
        with interrupts.stop_on_signals():
            return args.func(args)
    except (*USER_ERRORS, DataError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"pouta: error: {msg}", file=sys.stderr)
        return 2
    except ClusterStalled as exc:
        _kill_open_runs()
        print(f"pouta: error: {exc}; rerun the same command (sweep: with --resume) once it fits", file=sys.stderr)
        return 3
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM (interrupts.Interrupted), once or twice
        _kill_open_runs()
        hint = RESUME_HINTS.get(args.command, "")
        print(f"pouta: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return interrupts.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
