"""Read the sweeps of bench/search_pays.sh (their reports' trials.csv and verdict lines) and
print, per category: what was registered (a searched config or the default), its test gain over
the default (pixel AP, the config's mean over its 3 seeds minus the default's: the first seed
and the confirmation round's two fresh ones), the Spearman correlation of validation and test
over the searched trials that trained to their end, and the trials and minutes it cost; then
the mean gain and the worst category against the target decided before the runs (mean >=
+0.03, none below -0.01).

Validation decides; test is reported. Usage: python bench/search_pays.py WORKDIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from statistics import mean

from scipy.stats import spearmanr
from sweep_vs_default import METRIC, f, trial_rows  # bench/ is this script's folder: on sys.path

TARGET_MEAN, TARGET_WORST = 0.03, -0.01


def category_figures(rows: list[dict]) -> dict:
    ok, _, default, searched = trial_rows(rows)
    full = [r for r in searched if int(float(r["epoch"] or 0)) >= int(float(default["epoch"]))]
    seeds: dict[str, list[dict]] = {}
    for r in ok:
        seeds.setdefault(r["confirms"] or r["trial_id"], []).append(r)

    def config_test(trial: str) -> float:   # the config's test value, mean over its seeds
        return mean(f(r, f"test_{METRIC}") for r in seeds[trial])

    chosen = next((r for r in ok if r["chosen"] == "yes"), default)
    config = chosen["confirms"] or chosen["trial_id"]
    rho = (spearmanr([f(r, f"val_{METRIC}") for r in full], [f(r, f"test_{METRIC}") for r in full]).statistic
           if len(full) >= 3 else float("nan"))
    return {"registered": "default" if config == default["trial_id"] else f"searched {config}",
            "gain": config_test(config) - config_test(default["trial_id"]),
            "seeds": (len(seeds[config]), len(seeds[default["trial_id"]])),
            "default_test": config_test(default["trial_id"]),
            "rho": rho, "trials": len(rows), "to_the_end": len(full), "searched": len(searched)}


def main(work: Path) -> None:
    seconds = dict(line.split() for line in (work / "seconds.txt").read_text().splitlines()) \
        if (work / "seconds.txt").is_file() else {}
    print(f"search vs default ({METRIC}; validation decides, test reported; gains: config means over its seeds)")
    print(f"{'sweep':14} {'category':9} {'registered':18} {'seeds':>5} {'default test':>12} {'Δtest':>7} "
          f"{'rho':>5} {'searched (to the end)':>21} {'trials':>6}")
    cases = []
    for report in sorted((work / "ray").glob("*-report")):
        rows = list(csv.DictReader((report / "trials.csv").open()))
        sweep = report.name.removesuffix("-report")
        for category in sorted({r["category"] for r in rows}):
            fig = category_figures([r for r in rows if r["category"] == category])
            cases.append(fig)
            print(f"{sweep:14} {category:9} {fig['registered']:18} {fig['seeds'][0]:>2}/{fig['seeds'][1]:<2} "
                  f"{fig['default_test']:12.4f} {fig['gain']:+7.4f} {fig['rho']:+5.2f} "
                  f"{fig['searched']:>14} ({fig['to_the_end']:>2}) {fig['trials']:6d}")
        for line in (report / "trials.md").read_text().splitlines():
            if line.startswith("- "):
                print(f"  {line[2:]}")
        if sweep in seconds:
            print(f"  {sweep}: {int(seconds[sweep]) / 60:.1f} minutes")
    if not cases:
        return
    gains = [c["gain"] for c in cases]
    worst = min(gains)
    registered = sum(c["registered"] != "default" for c in cases)
    rhos = [c["rho"] for c in cases if c["rho"] == c["rho"]]   # defined where 3 or more trained to the end
    print(f"over {len(cases)} categories: mean Δtest {mean(gains):+.4f} (target >= +{TARGET_MEAN}), worst {worst:+.4f} "
          f"(target >= {TARGET_WORST}); a searched config registered on {registered}; "
          f"mean rank correlation {mean(rhos) if rhos else float('nan'):+.2f} (of {len(rhos)}); "
          f"{'target met' if mean(gains) >= TARGET_MEAN and worst >= TARGET_WORST else 'target NOT met'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
