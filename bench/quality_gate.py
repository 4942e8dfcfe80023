"""The quality gate's table and verdict (bench/quality_gate.sh), by a rule fixed before any run:

- Validation decides; test is printed beside it and never read by the rule.
- Gated: the two localisation metrics that anomaly synthesis shapes, **pixel AP** (what sweeps
  select on by default) and **AUPRO**. Image AUROC and pixel AUROC are printed, not gated.
- Per category and gated metric, the proposal is *worse* when its mean over seeds is below the
  default's by more than one spread, the spread being the larger of the two arms' seed standard
  deviations (population, as every table in docs/experiments.md); *better* when above by more.
- ``n``: seeds per arm (a gate stopped early shows fewer; rerun the script to finish it).
- Verdict: ``non-inferior`` when no category is worse on a gated metric, else ``inferior``
  naming each (category, metric). Exit status 0 / 1.

Caveat, known in advance: with 3 seeds a change that does nothing is "worse" on a given
(category, metric) by chance in roughly one case in eight, so over 7 categories x 2 metrics an
``inferior`` verdict names a few cells even for a no-op. Read the margins printed next to the
verdict: a real loss shows as several categories, margins of several spreads, and the same
families in the per-family table (families.txt).

Usage: .venv/bin/python bench/quality_gate.py WORKDIR   (WORKDIR/runs/<category>-<arm>-seed<N>)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro")
GATED = ("pixel_ap", "pixel_aupro")
ARMS = ("default", "proposed")


def load(work: Path) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in sorted((work / "runs").iterdir()):
        if not (run / "row.json").is_file():
            continue
        row = json.loads((run / "row.json").read_text())
        for split in ("val", "test"):
            row[split] = json.loads((run / f"eval-{split}.json").read_text())["all"]
        rows[(row["category"], row["arm"])].append(row)
    return rows


def judge(rows: dict[tuple[str, str], list[dict]]) -> tuple[list[str], list[tuple[str, str, float, float]]]:
    """-> (table lines, worse cells as (category, metric, difference, spread))."""
    categories = list(dict.fromkeys(c for c, _ in rows))
    lines = [f"{'category':9} {'metric':12} {'n':>2} {'default (val)':>16} {'proposed (val)':>16} {'diff':>7} "
             f"{'spread':>7} {'call':>7}   {'default (test)':>16} {'proposed (test)':>16}"]
    worse = []
    for cat in categories:
        if not all((cat, a) in rows for a in ARMS):
            lines.append(f"{cat:9} (missing an arm: skipped)")
            continue
        for key in KEYS:
            val = {a: [r["val"][key] for r in rows[(cat, a)]] for a in ARMS}
            test = {a: [r["test"][key] for r in rows[(cat, a)]] for a in ARMS}
            diff = mean(val["proposed"]) - mean(val["default"])
            spread = max(pstdev(val["default"]), pstdev(val["proposed"]))
            call = "-" if key not in GATED else ("worse" if diff < -spread else "better" if diff > spread else "same")
            if call == "worse":
                worse.append((cat, key, diff, spread))
            cells = [f"{mean(val[a]):.3f}±{pstdev(val[a]):.3f}" for a in ARMS]
            tcells = [f"{mean(test[a]):.3f}±{pstdev(test[a]):.3f}" for a in ARMS]
            n = min(len(val["default"]), len(val["proposed"]))
            lines.append(f"{cat:9} {key:12} {n:>2} {cells[0]:>16} {cells[1]:>16} {diff:+7.3f} {spread:7.3f} "
                         f"{call:>7}   {tcells[0]:>16} {tcells[1]:>16}")
    return lines, worse


def main() -> int:
    work = Path(sys.argv[1])
    meta = json.loads((work / "gate.json").read_text()) if (work / "gate.json").is_file() else {}
    rows = load(work)
    seeds = {a: sorted({r["seed"] for (c, arm), rs in rows.items() if arm == a for r in rs}) for a in ARMS}
    print(f"quality gate: proposed [{meta.get('proposed', '?')}] against the defaults"
          f"{' with ' + meta['base'] if meta.get('base') else ''}; tiny preset, {meta.get('epochs', '?')} epochs, "
          f"seeds {seeds['default']}; mean ± spread over seeds; validation decides, test reported")
    lines, worse = judge(rows)
    print("\n".join(lines))
    seconds = {a: sum(r["train_seconds"] for (c, arm), rs in rows.items() if arm == a for r in rs) for a in ARMS}
    if seconds["default"]:
        print(f"training time, proposed / default: {seconds['proposed'] / seconds['default']:.2f} "
              f"({seconds['proposed']} s / {seconds['default']} s, side by side)")
    if worse:
        cells = "; ".join(f"{c} {k} {d:+.3f} (spread {s:.3f})" for c, k, d, s in worse)
        print(f"verdict: inferior: worse by more than one spread on validation in {cells}")
        return 1
    print("verdict: non-inferior: no category worse by more than one spread on validation pixel AP or AUPRO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
