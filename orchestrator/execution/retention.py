"""What a finished sweep leaves on the storage path (issue 46).

Tune keeps two checkpoints per trial (``CheckpointConfig(num_to_keep=2)``), each with the Adam
state (about twice the weights again): at the paper preset ~180 MB a checkpoint, ~380 GB for a
sweep of 15 categories x 70 trials, ASHA-stopped trials included. Once the sweep has chosen and
registered (the registered version holds its own copy of the weights in MLflow), most of it is
needed by no one: nothing resumes a finished trial.

*Decision*: after registration, a trial that is neither a default trial, nor a finalist (a
searched trial the confirmation round trained again), nor a confirmation trial, nor the
registered one keeps **no** checkpoint; a kept trial keeps only the checkpoint its results
name, as **inference weights** (:func:`pouta_core.checkpoint.inference_state`: no optimizer,
scheduler or scaler). ``--keep-checkpoints`` keeps everything as Tune left it. A pruned trial's
MLflow run keeps its metrics, config and artifacts (``metrics.json``, heat maps); its weights
are gone (``pouta predict --model runs:/...`` of it says the checkpoint is not found).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL
from pouta_core.checkpoint import CHECKPOINT, keep_for_inference

log = logging.getLogger(__name__)


@dataclass
class Pruned:
    """What :func:`prune` did."""

    removed_trials: int = 0
    removed_bytes: int = 0
    kept_trials: int = 0
    kept_bytes: int = 0

    @property
    def line(self) -> str:
        return (f"checkpoints: {self.removed_trials} trial(s) not kept ({self.removed_bytes / 1e6:.1f} MB freed), "
                f"{self.kept_trials} kept as inference weights ({self.kept_bytes / 1e6:.1f} MB); "
                "--keep-checkpoints keeps every one")


def kept_trials(summary: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The trials whose weights a finished sweep keeps: the registered one, the defaults, the
    finalists and their confirmation trials, per category."""
    keep: set[str] = set()
    for entry in summary.values():
        if (entry.get("best") or {}).get("trial_id"):
            keep.add(entry["best"]["trial_id"])
        for row in entry.get("trials", []):
            config = row.get("config") or {}
            if config.get(DEFAULT_TRIAL) or config.get(CONFIRM_OF):
                keep.add(row["trial_id"])
            if config.get(CONFIRM_OF):
                keep.add(config[CONFIRM_OF])
    return keep


def prune(rows: Iterable[Mapping[str, Any]], keep: set[str]) -> Pruned:
    """Remove the checkpoints of every trial in ``rows`` not in ``keep``; reduce a kept trial
    to the checkpoint its row names, as inference weights."""
    done = Pruned()
    kept: list[Path] = []
    for row in rows:
        named = Path(row["checkpoint"]) if row.get("checkpoint") else None
        if named is None or not named.is_dir():
            continue
        wanted = row.get("trial_id") in keep
        for folder in (p for p in named.parent.glob("checkpoint_*") if p.is_dir() and not (wanted and p == named)):
            done.removed_bytes += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        if wanted:
            kept.append(named)
        else:
            done.removed_trials += 1
    for named in kept:   # nothing resumes a finished trial: the weights alone
        if (named / CHECKPOINT).is_file():
            done.removed_bytes += keep_for_inference(named)
        done.kept_trials += 1
        done.kept_bytes += sum(f.stat().st_size for f in named.rglob("*") if f.is_file())
    return done
