"""``pouta``: the parser of every command, logging, and how a command ends: exit 2 for a user
error, 3 for a stalled cluster, 4 when MLflow stayed unreachable after the trials, 5 when a
trial errored (retrain: a category failed) while the rest finished, chosen and registered,
130 when interrupted (open MLflow runs marked KILLED; on SIGTERM before anything else), 1 for
anything unexpected (open runs marked FAILED first)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from orchestrator.cli.bench import add_bench_commands
from orchestrator.cli.experiments import add_cluster_commands
from orchestrator.cli.local import add_local_commands
from pouta_core.config import ConfigError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


# What finishes an interrupted command: its experiment state and MLflow runs are kept.
RESUME_HINTS = {"sweep": "rerun the same command with --resume",
                "launch": "rerun the same command with --resume",
                "retrain": "rerun the same command to resume it",
                "train": "rerun the same command to resume from the last checkpoint"}


def _end_open_runs(status: str = "KILLED", reason: str = "") -> None:
    outbox = sys.modules.get("orchestrator.tracking.outbox")
    if outbox is not None:   # first: no run is opened after this (what is queued stays in the journal)
        outbox.halt_all()
    tracking = sys.modules.get("orchestrator.tracking")   # loaded only by commands that track
    if tracking is not None:
        tracking.end_open_runs(status, reason)


def _kill_open_runs() -> None:
    _end_open_runs("KILLED", "the command was interrupted (Ctrl-C, SIGTERM or ray job stop); --resume continues it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pouta", description="POUTA visual anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; Tune's tables and Ray's worker output on the console")
    sub = parser.add_subparsers(dest="command", required=True)
    add_local_commands(sub)
    add_cluster_commands(sub)
    add_bench_commands(sub.add_parser("bench", help="benchmarks"))
    return parser


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
    from orchestrator.errors import ClusterStalled, TrackingIncomplete
    from orchestrator.execution import interrupts
    from pouta_core.data.errors import DataError

    try:
        if getattr(args, "max_image_pixels", None) is not None:
            from pouta_core.data.images import set_max_image_pixels

            set_max_image_pixels(args.max_image_pixels)
        with interrupts.stop_on_signals(first=_kill_open_runs):
            code = args.func(args)
        if hasattr(args, "procedural_source"):   # said once the command has run: an error stays one line
            from orchestrator.cli.args import load_config, source_notice

            source_notice(args, load_config(args))
        return code
    except (*USER_ERRORS, DataError) as exc:
        _end_open_runs("FAILED", "the command stopped on an error")   # it does not stay RUNNING
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"pouta: error: {msg}", file=sys.stderr)
        return 2
    except ClusterStalled as exc:
        _end_open_runs("KILLED", "the cluster could not hold a trial")
        print(f"pouta: error: {exc}; rerun the same command (sweep: with --resume) once it fits", file=sys.stderr)
        return 3
    except TrackingIncomplete as exc:
        print(f"pouta: error: {exc}; rerun the same command (sweep: with --resume) once MLflow is back",
              file=sys.stderr)
        return 4
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM (interrupts.Interrupted), once or twice
        _kill_open_runs()
        hint = RESUME_HINTS.get(args.command, "")
        print(f"pouta: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return interrupts.EXIT_CODE
    except Exception as exc:   # a bug, or a failure nobody foresaw: the runs say so, the traceback too
        _end_open_runs("FAILED", f"unexpected {type(exc).__name__}")
        logging.getLogger("pouta").exception("unexpected error")
        print(f"pouta: error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(traceback above; open MLflow runs marked FAILED)", file=sys.stderr)
        return 1
