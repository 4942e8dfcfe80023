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

**Confirmation** (part 2): a bootstrap over images cannot see a lucky seed (a model that
happens to fit the few validation images better is better on every resample of them:
measured, a sweep over ``seed`` alone registered seed 13 with P(better) = 1.00). So after the
search the ``--finalists`` best searched trials and the default are trained again on
``--confirm-seeds`` fresh seeds each (:mod:`orchestrator.execution.search`); the finalists are
ranked by their **mean over the fresh seeds only**, and the first is compared with the
default over those seeds: each bootstrap resample of the images averages the metric over each
side's seeds. *Decision*: the first seed is left out of the mean because it is the one the
search chose on: its value carries the winner's curse (with it, a seed-only sweep's lucky
seed still counted a third). The registered weights are the winning config's run with the
best validation value among all its seeds (the first included): the config was chosen on
fresh seeds, its weights on validation like any trial's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.execution.search import Confirmation
from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL, SAMPLED
from pouta_core.config import Config


@dataclass(frozen=True)
class Reference:
    """How the chosen trial is compared with the default."""

    confidence: float = 0.95     # P(better) the chosen trial needs to be registered
    resamples: int = 1000
    seed: int = 0
    default_trials: bool = True  # False (--no-default-trial): no default, the chosen trial registered as before
    confirmation: Confirmation = Confirmation()   # --finalists, --confirm-seeds


DEFAULT = Reference()


def default_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The category's default trial (not one of its confirmation trials), if it finished with
    a checkpoint."""
    return next((r for r in rows if (r.get("config") or {}).get(DEFAULT_TRIAL) and "error" not in r
                 and r.get("checkpoint") and not r["config"].get(CONFIRM_OF)), None)


def confirmation_groups(rows: list[dict[str, Any]], metric: str) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> the rows of its confirmation trials that finished with a checkpoint and a value."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        of = (r.get("config") or {}).get(CONFIRM_OF)
        if of and "error" not in r and r.get("checkpoint") and r.get(metric) is not None:
            groups.setdefault(of, []).append(r)
    return groups


def _mean(values: list[Any]) -> float:
    ok = [float(v) for v in values if isinstance(v, int | float) and v == v]
    return sum(ok) / len(ok) if ok else float("nan")


def _none_searched(rows: list[dict[str, Any]], config: Config) -> str | None:
    """Why no searched trial could be compared with the default, in a few words, when none
    trained to its end (every one errored or was stopped early); None when one did."""
    searched = [r for r in rows if not (r.get("config") or {}).get(DEFAULT_TRIAL)
                and not (r.get("config") or {}).get(CONFIRM_OF)]

    def to_end(r: dict[str, Any]) -> bool:
        epochs = ((r.get("config") or {}).get(SAMPLED) or {}).get("epochs", config.epochs)
        return "error" not in r and r.get("checkpoint") and (r.get("epoch") or 0) >= epochs

    if any(to_end(r) for r in searched):
        return None
    failed = sum("error" in r for r in searched)
    return (f"no searched trial trained to its end ({len(searched) - failed} stopped early, {failed} failed, of "
            f"{len(searched)}): nothing to compare with the default")


def versus_default(plan, configs: dict[str, Config], chosen: dict[str, dict[str, Any]],
                   objectives: list[tuple[str, str]], reference: Reference) -> dict[str, dict[str, Any]]:
    """Per category, ``chosen[category]`` with ``versus_default`` (what was compared and
    decided) and ``best`` the row to register: the searched choice when it beat the default,
    else the default's (the searched one kept as ``searched_best``)."""
    from pouta_core.bootstrap import BOOTSTRAP_METRICS

    metric, mode = objectives[0]
    name = metric.removeprefix("val_")
    paired = name in BOOTSTRAP_METRICS and mode == "max" and len(objectives) == 1
    out = {}
    for category, entry in chosen.items():
        best, rows = entry.get("best"), entry.get("trials", [])
        default = default_row(rows)
        if best is None or not reference.default_trials:
            out[category] = entry
            continue
        evidence = _evidence_of(plan, configs[category], category)
        groups = confirmation_groups(rows, metric)
        winner = None
        if default is None:
            verdict = {"chosen": "searched", "compared": False, "reason": "no default trial finished"}
        elif groups.get(default["trial_id"]) and len(groups) > 1:
            verdict, winner = _confirmed(rows, groups, default, metric, mode, paired, evidence, reference)
        elif best["trial_id"] == default["trial_id"]:
            verdict = {"chosen": "default", "compared": False,
                       "reason": _none_searched(rows, configs[category]) or
                       "no searched config beat the default (it is the best trial on validation)"}
        elif not paired:
            verdict = {"chosen": "searched", "compared": False,
                       "reason": f"no paired test for {metric} ({mode}): chosen by its value"}
        else:
            verdict = _compare(name, [best], [default], evidence, reference)
            verdict.update(searched_trial=best["trial_id"], default_trial=default["trial_id"],
                           searched_test=best.get(f"test_{name}"), default_test=default.get(f"test_{name}"))
        if winner is not None and winner is not best:
            entry = {**entry, "best": winner, "searched_best": best}
        elif verdict["chosen"] == "default" and default is not None and best is not default:
            entry = {**entry, "best": default, "searched_best": best}
        out[category] = {**entry, "versus_default": {**verdict, "line": verdict_line(category, verdict)}}
    return out


def _evidence_of(plan, config: Config, category: str):
    """row -> its checkpoint's validation evidence, every row on the same images (``config``'s split)."""
    from pouta_core.api import validation_evidence

    kwargs = {"data_root": plan.data.root, "dataset": plan.data.dataset, "category": category,
              "device": "auto", "cache_dir": plan.data.cache_dir, "split_like": config}
    return lambda row: validation_evidence(Path(row["checkpoint"]), **kwargs)


def _compare(name: str, searched: list[dict[str, Any]], default: list[dict[str, Any]], evidence,
             reference: Reference) -> dict[str, Any]:
    """The paired bootstrap of ``searched`` rows against ``default`` rows (seeds of one config
    each) -> the verdict's figures."""
    from pouta_core.bootstrap import paired_bootstrap

    a = [evidence(r) for r in searched]
    b = [evidence(r) for r in default]
    test = paired_bootstrap(name, [e for e, _ in a], [e for e, _ in b], a[0][1],
                            resamples=reference.resamples, seed=reference.seed)
    better = test.p_better >= reference.confidence
    return {"chosen": "searched" if better else "default", "compared": True, "metric": f"val_{name}",
            "searched": test.a, "default": test.b, "delta": test.delta, "low": test.low, "high": test.high,
            "p_better": test.p_better, "confidence": reference.confidence, "test_metric": f"test_{name}"}


def _confirmed(rows, groups, default, metric: str, mode: str, paired: bool, evidence,
               reference: Reference) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The confirmation round's verdict: the finalist with the best mean over its fresh seeds
    against the default's fresh seeds -> (verdict, the row to register)."""
    name = metric.removeprefix("val_")
    by_id = {r["trial_id"]: r for r in rows if r.get("trial_id")}
    mean = {of: _mean([r[metric] for r in rs]) for of, rs in groups.items()}
    sign = 1 if mode == "max" else -1
    finalists = sorted((of for of in groups if of != default["trial_id"]), key=lambda of: -sign * mean[of])
    top = finalists[0]
    if paired:
        verdict = _compare(name, groups[top], groups[default["trial_id"]], evidence, reference)
    else:
        better = sign * (mean[top] - mean[default["trial_id"]]) > 0
        verdict = {"chosen": "searched" if better else "default", "compared": False, "metric": metric,
                   "reason": f"no paired test for {metric} ({mode}): chosen by its mean over fresh seeds"}
    of = top if verdict["chosen"] == "searched" else default["trial_id"]
    own = [r for r in [by_id.get(of)] if r and "error" not in r and r.get("checkpoint") and r.get(metric) is not None]
    winner = (max if mode == "max" else min)([*own, *groups[of]], key=lambda r: r[metric])
    verdict.update(seeds=len(groups[top]), default_seeds=len(groups[default["trial_id"]]),
                   searched_trial=top, default_trial=default["trial_id"], registered_trial=winner["trial_id"],
                   finalists={t: mean[t] for t in [*finalists, default["trial_id"]]},
                   searched_test=_mean([r.get(f"test_{name}") for r in groups[top]]),
                   default_test=_mean([r.get(f"test_{name}") for r in groups[default["trial_id"]]]))
    return verdict, winner


def verdict_line(category: str, verdict: dict[str, Any]) -> str:
    """One line that says what the sweep found against the default."""
    seeds = verdict.get("seeds")
    ranked = (f". Finalists by their mean {verdict['metric']} over fresh seeds: "
              + ", ".join(f"{t}{' (default)' if t == verdict.get('default_trial') else ''} {v:.4f}"
                          for t, v in verdict["finalists"].items())
              if verdict.get("finalists") else "")
    if not verdict.get("compared"):
        who = "the default" if verdict["chosen"] == "default" else "the best trial"
        return f"{category}: {verdict['reason']}; {who} is registered{ranked}"
    over = f" (means over {seeds} fresh seed(s) each)" if seeds else ""
    span = (f"Δ {verdict['metric']} = {verdict['delta']:+.4f}{over}, "
            f"95% interval {verdict['low']:+.4f}..{verdict['high']:+.4f}")
    p = f"P(better) = {verdict['p_better']:.2f}"
    tests = (verdict["searched_test"], verdict["default_test"])
    test = (f" ({verdict['test_metric']}, reported only: {tests[0]:.4f} searched, {tests[1]:.4f} default)"
            if all(isinstance(t, float) and t == t for t in tests) else "")
    if verdict["chosen"] == "searched":
        return f"{category}: the chosen config beat the default ({span}, {p}); it is registered{test}{ranked}"
    return (f"{category}: no searched config beat the default ({span}, {p} < {verdict['confidence']}); "
            f"the default is registered{test}{ranked}")


def confirmation_cost(reference: Reference, num_samples: int, objectives: int = 1) -> str:
    """What the confirmation round will cost, said before the sweep starts."""
    c = reference.confirmation
    if not reference.default_trials or objectives > 1 or not c.on:
        why = ("--no-default-trial" if not reference.default_trials else
               "several objectives have no single ranking" if objectives > 1 else "--finalists/--confirm-seeds 0")
        return f"no confirmation round ({why}): the choice rests on each trial's first seed"
    finalists = min(c.finalists, num_samples)
    most = (finalists + 1) * c.seeds
    return (f"confirmation round: after each category's search, its {finalists} best searched config(s) and its "
            f"default train again on {c.seeds} fresh seed(s) each, to full length: up to {most} more trial(s) per "
            f"category, {most / (num_samples + 1):.0%} of the search's {num_samples + 1} "
            "(--confirm-seeds 0 turns it off)")
