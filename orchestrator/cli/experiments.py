"""On Ray, tracked in MLflow: ``launch``, ``sweep``, ``retrain``; and the registry: ``ui``,
``promote``. The work is in :mod:`orchestrator.commands`; here the arguments and the console."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestrator.cli.args import add_cluster_args, add_config_args, load_config, make_plan
from orchestrator.cli.console import (
    category_sets_note,
    mlflow_hint,
    print_errored,
    print_grid,
    print_summary,
    selection_warning,
)
from orchestrator.errors import EXIT_TRIALS_FAILED
from pouta_core.config import ConfigError


def _cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.commands.launch import run_launch
    from orchestrator.plan import SUMMARY_METRICS, both_splits

    plan = make_plan(args, args.name or f"launch-{args.dataset}")
    if args.dry_run:
        print(f"would train {', '.join(plan.categories)} with {plan.resources.workers} worker(s) each"
              + category_sets_note(plan))
        return 0
    summary = run_launch(plan, resume=args.resume)
    print_summary(summary, both_splits(SUMMARY_METRICS))
    selection_warning(plan)
    mlflow_hint(args)
    return EXIT_TRIALS_FAILED if print_errored(summary) else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import search_spaces
    from orchestrator.commands.sweep import check_category_sets, parse_objectives, run_sweep
    from orchestrator.execution.reference import Reference, confirmation_cost
    from orchestrator.execution.search import Confirmation
    from orchestrator.plan import both_splits
    from orchestrator.spec import short
    from orchestrator.tracking import report

    base = load_config(args)
    space = search_spaces.load(args.space, base)
    objectives = parse_objectives(args.objectives, args.metric, args.mode)
    plan = make_plan(args, args.name or f"sweep-{space.path.stem}-{args.dataset}", objectives[0][0], objectives[0][1])
    check_category_sets(plan, space)
    best_out = args.best_out or str(Path(args.storage_path) / f"{plan.run_name}-best.yaml")
    if not 0.5 <= args.confidence < 1 or args.bootstrap_resamples < 100:
        raise ConfigError("--confidence must be in [0.5, 1) and --bootstrap-resamples >= 100")
    if args.finalists < 0 or args.confirm_seeds < 0:
        raise ConfigError(f"--finalists and --confirm-seeds must be >= 0, got {args.finalists} and "
                          f"{args.confirm_seeds}")
    reference = Reference(args.confidence, args.bootstrap_resamples, default_trials=args.default_trial,
                          confirmation=Confirmation(args.finalists, args.confirm_seeds))
    if args.dry_run:
        print(f"would sweep {space.path.name} ({', '.join(space.keys)}) on {', '.join(plan.categories)}, "
              f"{args.num_samples} trial(s) each" + ("" if space.has_grid or not args.default_trial else
                                                     " after its default") + category_sets_note(plan))
        if not space.has_grid:
            print(confirmation_cost(reference, args.num_samples, len(objectives)))
        return 0
    if not space.has_grid:   # what the confirmation round costs, said before it is spent
        print(confirmation_cost(reference, args.num_samples, len(objectives)), flush=True)
    summary = run_sweep(plan, space, num_samples=args.num_samples, scheduler=args.scheduler,
                        study_storage=args.study_storage, resume=args.resume, objectives=objectives,
                        best_out=best_out, reference=reference, keep_checkpoints=args.keep_checkpoints)
    keys = both_splits([k for k, _ in objectives] + ["image_auroc", "pixel_auroc", "pixel_ap"])
    if space.has_grid:
        print_grid(summary, space, keys)
    print_summary(summary, keys)
    selection_warning(plan)
    for category, e in summary.items():
        if "config" in e:
            changed = " ".join(f"{k}={short(e['config'][k])}" for k in space.keys)
            print(f"best {category}: {changed}")
        for point in e.get("pareto", []):
            print(f"pareto {category}: " + ", ".join(f"{k}={point[k]:.4f}" for k, _ in objectives))
        if "versus_default" in e:
            print(e["versus_default"]["line"])
    print(f"best configs written to {best_out}; report (trials table, plots) in "
          f"{report.folder(Path(best_out).parent, plan.run_name)} and on the MLflow parent run")
    mlflow_hint(args)
    return EXIT_TRIALS_FAILED if print_errored(summary) else 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from orchestrator.commands.retrain import Gate, run_retrain
    from orchestrator.plan import selection_metric
    from pouta_core.config import parse_overrides

    gate = Gate(metric=args.metric, margin=args.promote_margin, confidence=args.confidence,
                resamples=args.bootstrap_resamples)
    plan = make_plan(args, args.name or f"retrain-{args.dataset}", selection_metric(args.metric), "max")
    if args.dry_run:
        print(f"would check {', '.join(plan.categories)} for changed data and retrain with params from "
              f"{args.params_from}")
        return 0
    summary = run_retrain(plan, params_from=args.params_from, gate=gate, force=args.force,
                          overrides=parse_overrides(args.overrides))
    for category, e in summary.items():
        detail = ""
        if "challenger" in e:
            detail = f"  challenger {e['metric']}={e['challenger']:.4f} (v{e['version']}), "
            detail += f"{e.get('reference') or 'champion'} "   # registered: the sweep's version, not champion yet
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
    selection_warning(plan)
    mlflow_hint(args)
    return EXIT_TRIALS_FAILED if failed else 0


def _cmd_ui(args: argparse.Namespace) -> int:
    """``mlflow ui`` on the store the other commands use, on 127.0.0.1 unless told otherwise."""
    from orchestrator import tracking
    from orchestrator.tracking.models import existing_store

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


def _cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.tracking import registry
    from orchestrator.tracking.models import existing_store

    store = existing_store(args.tracking_uri)     # never creates a store it then searches in vain
    try:
        registry.promote(MlflowClient(store), args.model, args.version, tracking.CHAMPION)
    except Exception as exc:  # MlflowException for an unknown model or version
        raise ConfigError(f"cannot promote {args.model} version {args.version} in {store}: "
                          f"{str(exc).splitlines()[0]}") from None
    print(f"{args.model}: champion -> version {args.version}")
    return 0


def _cmd_tracking_replay(args: argparse.Namespace) -> int:
    """Deliver what the drivers of an experiment left in its MLflow journal."""
    from orchestrator import tracking
    from orchestrator.errors import TrackingIncomplete
    from orchestrator.tracking import journal, records

    experiment = Path(args.storage_path).resolve() / args.name
    files = journal.journals(experiment)
    if not experiment.is_dir():
        raise ConfigError(f"--storage-path {args.storage_path} --name {args.name}: no experiment at {experiment}")
    if not files:
        print(f"{experiment}: no MLflow journal; nothing to replay")
        return 0
    header = journal.read(files[0]).header
    uri = args.tracking_uri or header.get("tracking_uri")
    name = args.experiment or header.get("experiment", "pouta")
    with tracking.quick_requests(10):   # one try per call: the journal waits, not the user
        try:
            client, exp_id = tracking.setup(uri, name)
        except Exception as exc:
            if not records.transient(exc):
                raise
            raise TrackingIncomplete(f"MLflow at {uri} is unreachable ({str(exc).splitlines()[0][:160]}); the records "
                                     f"of {experiment.name} are still in its journal") from None
        done = journal.replay(experiment, client, exp_id, by="pouta tracking replay")
    print(f"{experiment.name}: {done.summary} ({uri}, experiment {name})")
    if done.left:
        raise TrackingIncomplete(f"{done.left} records of {experiment.name} are still in its journal: {done.problem}")
    if done.live:
        print(f"{done.live} journal(s) belong to a driver that still runs: it sends them itself")
    return 0


def add_cluster_commands(sub) -> None:
    """On Ray, tracked in MLflow: launch, sweep, retrain; and the registry: ui, promote."""
    p = sub.add_parser("launch", help="train every category on Ray (in-process or a cluster)")
    add_cluster_args(p, None)
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment of --name (refused if its definition differs)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and data, run nothing")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna search per category, tracked in MLflow")
    p.add_argument("--space", required=True, help="search space YAML (or a bundled name: mss_lambdas, ...)")
    add_cluster_args(p, None)
    add_config_args(p)
    p.add_argument("--num-samples", type=int, default=8,
                   help="searched trials per category (an Optuna sweep also trains each category's default first)")
    p.add_argument("--metric", default="pixel_ap")
    p.add_argument("--mode", default="max", choices=["max", "min"])
    p.add_argument("--scheduler", choices=["asha", "none"],
                   help="default: asha; none with --objectives or a grid space (grid points train to full length)")
    p.add_argument("--study-storage", help="Optuna RDB URL or journal:///path (default: a file in the "
                   "experiment's folder: <storage-path>/<name>/optuna.db, or optuna.journal on a network filesystem, "
                   "where sqlite is refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment and studies of --name (refused if its definition differs)")
    p.add_argument("--objectives", help="multi-objective, e.g. pixel_ap:max,latency_ms:min (Pareto front)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="the chosen config is registered only when a paired bootstrap over the validation images "
                   "finds it better than the category's default trial with this probability; else the default is")
    p.add_argument("--bootstrap-resamples", type=int, default=1000)
    p.add_argument("--default-trial", action=argparse.BooleanOptionalAction, default=True,
                   help="train each category's base config first and register the chosen config only when it beats "
                   "it (default); --no-default-trial registers the best trial on its validation value alone")
    p.add_argument("--finalists", type=int, default=2,
                   help="after the search, train this many best searched configs per category and the default "
                   "again on --confirm-seeds fresh seeds, and rank them by their mean (default 2; 0: no round)")
    p.add_argument("--confirm-seeds", type=int, default=2,
                   help="fresh seeds per finalist and default (default 2; 0: no confirmation round)")
    p.add_argument("--best-out", help="YAML of the best config per category (default: in --storage-path)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every trial's checkpoints as Tune left them (default: once registered, only the "
                   "registered, default, finalist and confirmation trials keep one, as inference weights)")
    p.add_argument("--dry-run", action="store_true", help="check the space, arguments and data, run nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("retrain", help="retrain categories whose data changed; promote only if better")
    add_cluster_args(p, None)
    add_config_args(p)
    p.add_argument("--params-from", default="registered",
                   help="registered (the config of the registry's champion, else of the version a sweep "
                        "registered: its confirmed choice; default), champion (the champion's only) or a YAML "
                        "file from sweep (-best.yaml); 'best' is read as registered")
    p.add_argument("--promote-margin", type=float, default=0.005,
                   help="the challenger must beat the champion's validation metric by more than this")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="and be better in at least this share of paired bootstrap resamples of the images")
    p.add_argument("--bootstrap-resamples", type=int, default=1000)
    p.add_argument("--default-trial", action=argparse.BooleanOptionalAction, default=True,
                   help="train each category's base config first and register the chosen config only when it beats "
                   "it (default); --no-default-trial registers the best trial on its validation value alone")
    p.add_argument("--metric", default="pixel_ap", choices=["pixel_ap", "pixel_auroc", "image_auroc"],
                   help="validation metric of the gate and of --params-from best")
    p.add_argument("--force", action="store_true", help="retrain every category, changed or not")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and data, run nothing")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("tracking", help="MLflow bookkeeping of an experiment")
    tsub = p.add_subparsers(dest="tracking_command", required=True)
    p = tsub.add_parser("replay", help="send to MLflow what a stopped driver left in the experiment's journal "
                        "(records of an outage, an interrupt, a refused password) and end the runs it left RUNNING")
    p.add_argument("--storage-path", default="ray-results", help="as given to the sweep / launch / retrain")
    p.add_argument("--name", required=True, help="the experiment's --name")
    p.add_argument("--tracking-uri", help="default: where the journal's driver sent its records")
    p.add_argument("--experiment", help="MLflow experiment (default: the journal's)")
    p.set_defaults(func=_cmd_tracking_replay)

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
