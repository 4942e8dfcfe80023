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
    """The paper's Table 4 layout: one row per category and grid point, each metric as the mean
    ± sample standard deviation over the point's seeds (``seeds``: how many finished)."""
    import statistics

    from orchestrator.execution.scheduling import grid_point

    dims = [d for d in space.dimensions if d.distribution == "grid" and d.key != "seed"]
    point_of = grid_point(space)   # the grouping the choice by mean uses: a JSON list of the dims' values

    def grid_order(point: str) -> list[int]:
        return [list(d.values).index(v) for d, v in zip(dims, json.loads(point), strict=True)]

    print("  ".join(f"{d:>12}" for d in ["category", *(d.key for d in dims)]) + f"{'seeds':>7}"
          + "".join(f"{k:>19}" for k in keys))
    for category, e in summary.items():
        points: dict[str, list[dict]] = {}
        for row in e.get("trials", []):
            if "error" not in row:
                points.setdefault(point_of(row), []).append(row)
        for point in sorted(points, key=grid_order):
            rows = points[point]
            cells = []
            for k in keys:
                values = [r[k] for r in rows if r.get(k) is not None and r[k] == r[k]]
                if not values:
                    cells.append("-")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.4f}")
                else:
                    cells.append(f"{statistics.mean(values):.4f}±{statistics.stdev(values):.4f}")
            print("  ".join(f"{v:>12}" for v in [category, *(str(v) for v in json.loads(point))])
                  + f"{len(rows):>7}" + "".join(f"{c:>19}" for c in cells))
