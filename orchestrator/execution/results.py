"""What a finished Tune experiment gives back: one row per trial (its metrics, config and
checkpoint, or its error), and the best of them by a validation metric."""

from __future__ import annotations

from typing import Any


def trial_rows(results, metric_keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.error is not None or not r.metrics:
            rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else None, "error": str(r.error)})
            continue
        # Ray Train runs name their checkpoint in the metrics; one-worker trials are Tune's own.
        checkpoint = r.metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None)
        rows.append({"trial_id": r.metrics.get("trial_id"), "config": r.config, "path": r.path,
                     "checkpoint": checkpoint,
                     **{k: r.metrics.get(k) for k in ["epoch", *metric_keys]}})
    return rows


def best_checkpoint_of(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    ok = [r for r in rows if "error" not in r and r.get(metric) is not None and r.get("checkpoint")]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])
