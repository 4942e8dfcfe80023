"""What the commands print: JSON, the per-category summary (validation beside test), grid
tables, warnings and the hints that say where to look next (the MLflow UI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, allow_nan=True))


def category_sets_note(plan) -> str:
    return "".join(f"; {c}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                   for c, values in plan.per_category.items())


def print_summary(summary: dict, keys: list[str]) -> None:
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
        vals = "".join(f"{num(best.get(k)):>17}" for k in keys)
        print(f"{category:14}{vals}  {e.get('registered_model', '')} v{e.get('version', '?')} (challenger)")
    if no_test:
        print(f"no test metrics for {', '.join(no_test)}: no labelled test images (validation is synthetic)")


def print_errored(summary: dict) -> bool:
    """Name every errored trial on stderr, per category with a count: -> whether any errored."""
    from orchestrator.execution.results import errored

    failed = errored(summary)
    for category, (rows, total) in failed.items():
        print(f"{category}: {len(rows)} of {total} trial(s) errored", file=sys.stderr)
        for row in rows:
            print(f"  {row['trial_id'] or category}: {row['error']}", file=sys.stderr)
    return bool(failed)


def num(v) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def selection_warning(plan) -> None:
    if any(plan.config_for(c).val_split == "none" for c in plan.categories):
        print("WARNING: --val-split none: every choice was made on the test split, so these test metrics are "
              "optimistic", file=sys.stderr)


def pouta_command() -> str:
    """How to run ``pouta`` again from any shell: the console script beside this Python."""
    script = Path(sys.executable).parent / "pouta"
    return str(script) if script.is_file() else f"{sys.executable} -m orchestrator.cli"


def mlflow_hint(args: argparse.Namespace) -> None:
    from orchestrator import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///"):
        print(f"MLflow UI: {pouta_command()} ui --tracking-uri {uri}")
    else:
        print(f"MLflow UI: open {uri} in a browser")


def print_grid(summary: dict, space, keys: list[str]) -> None:
    from orchestrator.spec import SAMPLED

    dims = [d.key for d in space.dimensions if d.distribution == "grid"]
    print("  ".join(f"{d:>12}" for d in ["category", *dims]) + "".join(f"{k:>17}" for k in keys))
    for category, e in summary.items():
        for row in e.get("trials", []):
            if "error" in row:
                continue
            sampled = row["config"].get(SAMPLED, {})
            print("  ".join(f"{str(v):>12}" for v in [category, *[sampled.get(d) for d in dims]])
                  + "".join(f"{num(row.get(k)):>17}" for k in keys))
