"""Read the sweeps of bench/sweep_vs_default.sh (their reports' trials.csv and verdict lines)
and print, per sweep and category:

- the rank correlation (Spearman) between the searched trials' validation and test values;
- the search's pick without a round (the best first-seed validation value) against the
  default: its validation gain on that seed, and the test gain of its config, mean over its
  three seeds (the first and two fresh) against the default's three;
- what the round decided (the verdict line);
- replayed rounds: for F finalists and K fresh seeds, the config the round would rank first
  and the test gain of that config over the default (means over all three seeds: the best
  estimate here of what retraining the config gives). No gate: the ranking alone.

Validation decides; test is reported. Usage: python bench/sweep_vs_default.py WORK/ray
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from statistics import mean

from scipy.stats import spearmanr

METRIC = "pixel_ap"


def load(report: Path) -> tuple[list[dict], list[str]]:
    rows = list(csv.DictReader((report / "trials.csv").open()))
    lines = [line[2:] for line in (report / "trials.md").read_text().splitlines() if line.startswith("- ")]
    return rows, lines


def f(row: dict, key: str) -> float:
    return float(row[key]) if row.get(key) not in (None, "") else float("nan")


def trial_rows(rows: list[dict]) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """A category's rows of trials.csv -> (those with a value, the first seeds among them, the
    default's first seed, the searched trials' first seeds)."""
    ok = [r for r in rows if not r["error"] and r[f"val_{METRIC}"]]
    first = [r for r in ok if not r["confirms"]]
    default = next(r for r in first if r["default"] == "yes")
    return ok, first, default, [r for r in first if r["default"] != "yes"]


def category_figures(rows: list[dict]) -> dict:
    ok, first, default, searched = trial_rows(rows)
    seeds: dict[str, list[dict]] = {}
    for r in ok:
        if r["confirms"]:
            seeds.setdefault(r["confirms"], []).append(r)

    def fresh(trial: str, k: int, split: str) -> float:
        return mean(f(r, f"{split}_{METRIC}") for r in sorted(seeds[trial], key=lambda r: int(r["seed"]))[:k])

    by_id = {r["trial_id"]: r for r in first}

    def config_test(trial: str) -> float:   # the config's test value, mean over its three seeds
        return mean([f(by_id[trial], f"test_{METRIC}"), *(f(r, f"test_{METRIC}") for r in seeds[trial])])

    rho = spearmanr([f(r, f"val_{METRIC}") for r in first], [f(r, f"test_{METRIC}") for r in first]).statistic
    ranked = sorted(searched, key=lambda r: -f(r, f"val_{METRIC}"))
    pick = ranked[0]["trial_id"]
    d = default["trial_id"]
    out = {"n": len(first), "rho": rho,
           "pick_val_gain": f(by_id[pick], f"val_{METRIC}") - f(default, f"val_{METRIC}"),
           "pick_test_gain": config_test(pick) - config_test(d) if pick in seeds and d in seeds else float("nan"),
           "default_test": config_test(d) if d in seeds else float("nan"), "replay": {}}
    for finalists in (1, 2, 3):
        for k in (1, 2):
            pool = [r["trial_id"] for r in ranked[:finalists] if r["trial_id"] in seeds]
            if not pool or d not in seeds:
                continue
            top = max(pool, key=lambda t: fresh(t, k, "val"))
            beats = fresh(top, k, "val") > fresh(d, k, "val")
            chosen = top if beats else d
            out["replay"][(finalists, k)] = (chosen == d, config_test(chosen) - config_test(d))
    return out


def main(root: Path) -> None:
    print(f"sweep vs default ({METRIC}; validation decides, test reported; test gains are config means over 3 seeds)")
    print(f"{'sweep':22} {'category':8} {'n':>2} {'rho':>5} {'pick Δval':>9} {'pick Δtest':>10}  "
          "replayed rounds F/K: Δtest (d = default kept)")
    cases = []
    for report in sorted(root.glob("*-report")):
        rows, lines = load(report)
        for category in sorted({r["category"] for r in rows}):
            fig = category_figures([r for r in rows if r["category"] == category])
            cases.append(fig)
            replay = "  ".join(f"{fk[0]}/{fk[1]}: {gain:+.3f}{' d' if kept else ''}"
                               for fk, (kept, gain) in fig["replay"].items())
            print(f"{report.name.removesuffix('-report'):22} {category:8} {fig['n']:2d} {fig['rho']:+.2f} "
                  f"{fig['pick_val_gain']:+9.3f} {fig['pick_test_gain']:+10.3f}  {replay}")
        for line in lines:
            print(f"  {line}")
    if not cases:
        return
    # Over every sweep and category: what each policy's chosen config gains on test, on average.
    print(f"over {len(cases)} sweep-categories, mean Δtest of the chosen config over the default's "
          f"(default kept n times): no round {mean(c['pick_test_gain'] for c in cases):+.4f}; " +
          "; ".join(f"F{fk[0]}/K{fk[1]} {mean(c['replay'][fk][1] for c in cases):+.4f} "
                    f"({sum(c['replay'][fk][0] for c in cases)})"
                    for fk in cases[0]["replay"] if all(fk in c["replay"] for c in cases)))
    print(f"mean rank correlation of validation and test over the searched trials: "
          f"{mean(c['rho'] for c in cases):+.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
