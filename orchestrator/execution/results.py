"""What a finished Tune experiment gives back: one row per trial (its metrics, config and
checkpoint, or its error), and the choice per category: the best trial by the first
objective (a validation metric) and, for several objectives, the Pareto front."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.spec import CHECKPOINT_EPOCH, CONFIRM_OF

# In a report to Tune: the epoch's other numbers (loss terms, the metrics no choice reads, test
# metrics, timings) as one JSON string (issue 28). Tune keeps running statistics of every number
# a report holds, for every trial, and rewrites them all in its experiment state every few
# seconds: 35 kB per trial at 34 numbers, 34 MB per snapshot at 960 trials. A string it stores
# and passes on, unread; :func:`unpacked` gives the numbers back.
FIGURES = "figures"
# In a trial's final report, when its space lists scoring options: the scoring keys' values it
# chose after training (issue 45), as one JSON string.
SCORING = "scoring"
# Always numbers in a report: what Tune's schedulers, the searches and the driver read.
TUNE_KEYS = ("epoch", CHECKPOINT_EPOCH)


def packed(metrics: Mapping[str, Any], tune_metrics: tuple[str, ...]) -> dict[str, Any]:
    """A trial's numeric ``metrics`` as reported to Tune: :data:`TUNE_KEYS` and ``tune_metrics``
    (the metrics the sweep schedules and chooses on) as numbers, the rest in :data:`FIGURES`."""
    kept = {*TUNE_KEYS, *tune_metrics}
    out = {k: v for k, v in metrics.items() if k in kept}
    rest = {k: float(v) for k, v in metrics.items() if k not in kept}
    if rest:
        out[FIGURES] = json.dumps(rest)
    return out


def unpacked(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """A reported ``result`` (Tune's, or a row of a trial's history) with its :data:`FIGURES`
    numbers put back beside the others."""
    result = dict(result or {})
    figures = result.pop(FIGURES, None)
    if isinstance(figures, str):   # a history row from before the first report holding it: NaN
        result = {**json.loads(figures), **result}
    return result


def error_line(error: BaseException | str | None) -> str:
    """The line of a trial's error a user acts on: the exception's own message, which is the
    last line of the traceback a Ray task error carries."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else (type(error).__name__ if error is not None else "no result")


def trial_rows(results, metric_keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.error is not None or not r.metrics:
            # A trial that failed before its first report has no metrics: its folder names it.
            trial_id = (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else None)
            rows.append({"trial_id": trial_id, "error": error_line(r.error)})
            continue
        metrics = at_checkpoint(r)
        # Ray Train runs name their checkpoint in the metrics; one-worker trials are Tune's own.
        checkpoint = metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint and metrics else None)
        rows.append({"trial_id": r.metrics.get("trial_id"), "config": r.config, "path": r.path,
                     "checkpoint": checkpoint, **scoring_of(r.metrics),
                     **{k: (metrics or unpacked(r.metrics)).get(k) for k in ["epoch", *metric_keys]}})
    return rows


def scoring_of(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"scoring": {key: value}}``, what a trial chose after training, or {} (none chosen)."""
    text = (result or {}).get(SCORING)
    return {SCORING: json.loads(text)} if isinstance(text, str) else {}


def at_checkpoint(result) -> dict[str, Any]:
    """The metrics reported with the checkpoint a trial holds -> a dict ({} when no report of
    that epoch is found).

    A trial checkpoints every ``checkpoint_every`` epochs and reports every ``eval_every``: when
    its last report had no checkpoint (ASHA stopped it between two), its last metrics are not
    the ones of the weights it holds. *Decision* (issue 28): a trial is chosen, registered and
    shown by the metrics of the epoch its checkpoint holds (``checkpoint_epoch``, which every
    report carries), read from the trial's reported history."""
    metrics = unpacked(result.metrics)
    held = metrics.get(CHECKPOINT_EPOCH)
    if held is None or held == metrics.get("epoch"):
        return metrics
    history = result.metrics_dataframe
    if history is None or "epoch" not in history:
        return {}
    rows = history[history["epoch"] == held]
    if "checkpoint_path" in rows:   # a Ray Train run: the report that carried the checkpoint
        rows = rows[rows["checkpoint_path"].notna()]
    if rows.empty:
        return {}
    return unpacked({k: v for k, v in rows.iloc[-1].to_dict().items() if v == v})   # NaN: a key this report had not


def best_checkpoint_of(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    ok = [r for r in rows if "error" not in r and r.get(metric) is not None and r.get("checkpoint")]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])


def pareto_front(rows: list[dict[str, Any]], objectives: list[tuple[str, str]]) -> list[dict[str, Any]]:
    ok = [r for r in rows if "error" not in r and all(r.get(k) is not None for k, _ in objectives)]

    def better_or_equal(a, b):
        return all((a[k] >= b[k]) if m == "max" else (a[k] <= b[k]) for k, m in objectives)

    return [r for r in ok if not any(better_or_equal(o, r) and o is not r and
                                     any(o[k] != r[k] for k, _ in objectives) for o in ok)]


def errored(summary: dict[str, dict[str, Any]]) -> dict[str, tuple[list[dict[str, Any]], int]]:
    """Per category with an errored trial (or no result at all): (the errored rows, the number
    of trials). What the command prints and why it exits 5."""
    out = {}
    for category, entry in summary.items():
        rows = entry.get("trials", [])
        bad = [r for r in rows if "error" in r]
        if bad:
            out[category] = (bad, len(rows))
        elif "error" in entry:
            out[category] = ([{"trial_id": None, "error": entry["error"]}], max(len(rows), 1))
    return out


def best_point(rows: list[dict[str, Any]], metric: str, mode: str,
               point_of: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The rows of the grid point whose mean ``metric`` over its seeds is best."""
    points: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r and r.get(metric) is not None and r.get("checkpoint"):
            points.setdefault(point_of(r), []).append(r)
    if not points:
        return []
    mean = {p: sum(r[metric] for r in rs) / len(rs) for p, rs in points.items()}
    return points[(max if mode == "max" else min)(mean, key=mean.__getitem__)]


def choose(results, categories: list[str], objectives: list[tuple[str, str]],
           keys: list[str], point_of: Callable[[dict[str, Any]], str] | None = None) -> dict[str, dict[str, Any]]:
    """Per category: ``trials`` (its rows), ``pareto`` (several objectives only), and ``best``
    (the row of the best trial with a checkpoint by the first objective) or ``error``.

    With ``point_of`` (a grid: a row -> its grid point without the seed), ``best`` is the best
    seed of the grid point with the best *mean* over its seeds. *Decision*: the best single
    trial of an ablation was a lucky seed of the worst variant on average (the demo's
    pouta-hsg: 0.52 ± 0.62 over 2 seeds, one of them 0.96)."""
    metric, mode = objectives[0]
    chosen: dict[str, dict[str, Any]] = {}
    for category in categories:
        rows = trial_rows([r for r in results if (r.config or {}).get("category") == category], keys)
        entry: dict[str, Any] = {"trials": rows}
        if len(objectives) > 1:
            entry["pareto"] = pareto_front(rows, objectives)
        # The search's choice; confirmation trials (a finalist's config on fresh seeds) are
        # :mod:`orchestrator.execution.reference`'s to read.
        searched = [r for r in rows if not (r.get("config") or {}).get(CONFIRM_OF)]
        best = best_checkpoint_of(best_point(searched, metric, mode, point_of) if point_of else searched, metric, mode)
        chosen[category] = ({**entry, "best": best} if best
                            else {**entry, "error": "no trial finished with a checkpoint"})
    return chosen
