"""The hard benchmark's results table (docs/experiments.md): per category and defect family,
each model's image AUROC, pixel AUROC, pixel AP and AUPRO, mean and spread over seeds, on
validation (what decides) and test (reported), from the `eval-val.json` / `eval-test.json`
files `bench/hard_benchmark.sh` writes into each run folder (`pouta evaluate --by-defect`).

Usage: .venv/bin/python bench/hard_table.py [--prefix eval] [LABEL=]RUNS_DIR...
Run folders are named <category>-<variant>-seed<N>; LABEL (default: the variant) names the
model in the table, so that ablations of one variant from several work folders stay apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")


def collect(spec: str, prefix: str) -> dict[tuple[str, str, str], list[tuple[dict, dict]]]:
    label, _, folder = spec.rpartition("=")
    out: dict[tuple[str, str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for run in sorted(Path(folder).iterdir()):
        if not (run / f"{prefix}-test.json").is_file():
            continue
        category, *variant, _seed = run.name.split("-")
        splits = [json.loads((run / f"{prefix}-{s}.json").read_text()) for s in ("val", "test")]
        for family in ("all", *splits[1]["by_defect"]):
            val, test = (s["all"] if family == "all" else s["by_defect"].get(family, {}) for s in splits)
            out[(category, family, label or "-".join(variant))].append((val, test))
    return out


def cell(values: list[float]) -> str:
    values = [v for v in values if v == v]   # NaN: a split without that family
    return f"{mean(values):.3f} ± {pstdev(values):.3f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="eval", help="the evaluation files' prefix (default: eval)")
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUNS_DIR")
    args = parser.parse_args(argv)
    rows: dict[tuple[str, str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for spec in args.runs:
        for key, got in collect(spec, args.prefix).items():
            rows[key] += got
    print("| category | family | model | seeds | " + " | ".join(f"val {k}" for k in KEYS) + " | "
          + " | ".join(f"test {k}" for k in KEYS) + " |")
    print("|" + "---|" * (4 + 2 * len(KEYS)))
    for (category, family, model), rs in sorted(rows.items()):
        cells = [cell([r[i].get(k, float("nan")) for r in rs]) for i in (0, 1) for k in KEYS]
        print(f"| {category} | {family} | {model} | {len(rs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
