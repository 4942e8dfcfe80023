"""The sweep's choice against its default (issue 30): is the trial chosen on validation better
than the base config, or a lucky draw among noisy validation scores?

Every Optuna sweep trains each category's **default** first (the base config, labelled
``default``; :class:`orchestrator.execution.scheduling.CategorySearch`). After the search, the
chosen trial and the default are scored on the same validation images and compared by a
paired bootstrap over images (:func:`pouta_core.bootstrap.paired_bootstrap`, the retrain
gate's test): the difference of the first objective, its 95% interval, and P(better). The
chosen config is registered only when P(better) >= ``--confidence`` (0.95); otherwise the
default is, and the summary says that no searched config beat it. Test values of both are
reported beside, never used.

*Decision*: the maximum of N noisy validation values is biased upward (the winner's curse):
on held-out real textures a sweep's winner claimed +0.03 validation pixel AP and delivered
-0.01 on test, and nothing said so. The default is a trial of the same experiment (same data,
same split, same schedule) so the comparison is paired; ASHA never stops it. Objectives the
bootstrap does not cover (anything but image AUROC, pixel AUROC and pixel AP), minimised ones,
and grid sweeps (whose points are chosen by their mean over seeds) keep the chosen trial and say
that it was not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import DEFAULT_TRIAL
from pouta_core.config import Config


@dataclass(frozen=True)
class Reference:
    """How the chosen trial is compared with the default."""

    confidence: float = 0.95     # P(better) the chosen trial needs to be registered
    resamples: int = 1000
    seed: int = 0
    default_trials: bool = True  # False (--no-default-trial): no default, the chosen trial registered as before


def default_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The category's default trial, if it finished with a checkpoint."""
    return next((r for r in rows if (r.get("config") or {}).get(DEFAULT_TRIAL) and "error" not in r
                 and r.get("checkpoint")), None)


def versus_default(plan, configs: dict[str, Config], chosen: dict[str, dict[str, Any]],
                   objectives: list[tuple[str, str]], reference: Reference) -> dict[str, dict[str, Any]]:
    """Per category, ``chosen[category]`` with ``versus_default`` (what was compared and
    decided) and, when the chosen trial did not beat the default, ``best`` replaced by the
    default's row (the searched one kept as ``searched_best``)."""
    from pouta_core.api import validation_evidence
    from pouta_core.bootstrap import BOOTSTRAP_METRICS, paired_bootstrap

    metric, mode = objectives[0]
    name = metric.removeprefix("val_")
    out = {}
    for category, entry in chosen.items():
        best, default = entry.get("best"), default_row(entry.get("trials", []))
        if best is None:
            out[category] = entry
            continue
        if not reference.default_trials:
            out[category] = entry
            continue
        if default is None:
            verdict = {"chosen": "searched", "compared": False, "reason": "no default trial finished"}
        elif best["trial_id"] == default["trial_id"]:
            verdict = {"chosen": "default", "compared": False,
                       "reason": "no searched config beat the default (it is the best trial on validation)"}
        elif name not in BOOTSTRAP_METRICS or mode != "max" or len(objectives) > 1:
            verdict = {"chosen": "searched", "compared": False,
                       "reason": f"no paired test for {metric} ({mode}): chosen by its value"}
        else:
            kwargs = {"data_root": plan.data.root, "dataset": plan.data.dataset, "category": category,
                      "device": "auto", "cache_dir": plan.data.cache_dir, "split_like": configs[category]}
            searched, labels = validation_evidence(Path(best["checkpoint"]), **kwargs)
            base, _ = validation_evidence(Path(default["checkpoint"]), **kwargs)
            test = paired_bootstrap(name, searched, base, labels, resamples=reference.resamples, seed=reference.seed)
            better = test.p_better >= reference.confidence
            verdict = {"chosen": "searched" if better else "default", "compared": True, "metric": metric,
                       "searched": test.a, "default": test.b, "delta": test.delta, "low": test.low,
                       "high": test.high, "p_better": test.p_better, "confidence": reference.confidence,
                       "searched_trial": best["trial_id"], "default_trial": default["trial_id"],
                       "test_metric": f"test_{name}", "searched_test": best.get(f"test_{name}"),
                       "default_test": default.get(f"test_{name}")}
        if verdict["chosen"] == "default" and default is not None and best is not default:
            entry = {**entry, "best": default, "searched_best": best}
        out[category] = {**entry, "versus_default": {**verdict, "line": verdict_line(category, verdict)}}
    return out


def verdict_line(category: str, verdict: dict[str, Any]) -> str:
    """One line that says what the sweep found against the default."""
    if not verdict.get("compared"):
        who = "the default" if verdict["chosen"] == "default" else "the best trial"
        return f"{category}: {verdict['reason']}; {who} is registered"
    span = (f"Δ {verdict['metric']} = {verdict['delta']:+.4f}, "
            f"95% interval {verdict['low']:+.4f}..{verdict['high']:+.4f}")
    p = f"P(better) = {verdict['p_better']:.2f}"
    tests = (verdict["searched_test"], verdict["default_test"])
    test = (f" ({verdict['test_metric']}, reported only: {tests[0]:.4f} searched, {tests[1]:.4f} default)"
            if all(isinstance(t, float) and t == t for t in tests) else "")
    if verdict["chosen"] == "searched":
        return f"{category}: the chosen config beat the default ({span}, {p}); it is registered{test}"
    return (f"{category}: no searched config beat the default ({span}, {p} < {verdict['confidence']}); "
            f"the default is registered{test}")
