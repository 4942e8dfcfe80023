"""Scoring options chosen after training, on the run's own validation images (issue 45).

The scoring keys (``Config.SCORING_KEYS``: ``map_heads_weight``, ``image_score``,
``image_score_topk``, ``image_score_pool``, ``score_norm``) say how a trained model's map and
score are read; none changes a weight. So a sweep does not train a model per value: the weights
are produced once and read every way a search space lists (its ``scoring:`` section), and the
way with the best validation value is kept, in the run's config, its checkpoint and every
export of it.

*Decision*, the rule: candidates are every combination of the listed values, the run's own
values first; the best is the one with the highest validation value of the objective, then of
validation image AUROC (a pixel objective cannot tell image-score options apart, and image
AUROC is what decides which image is flagged); a tie keeps the earlier candidate, so a key
that changes nothing stays as the config had it. A candidate the validation split cannot
support (``score_norm: pixel`` with fewer than 2 good validation images) is left out. Good
images are scored leave-one-out under ``score_norm: pixel`` (:meth:`Scorer.calibrate`), so the
statistics are not fitted to the images they are judged on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pouta_core.config import Config, ConfigError
from pouta_core.data.datasets import EvalDataset
from pouta_core.inference import predict
from pouta_core.metrics import auroc, compute, f1_max
from pouta_core.model.scoring import Scorer

CHOICE_FILE = "scoring_choice.json"   # the candidates and their validation values, beside the checkpoint
IMAGE_METRICS = ("image_auroc", "image_f1max")
TIE_BREAK = "image_auroc"


@dataclass(frozen=True)
class ScoringChoice:
    """``chosen``: the scoring keys' values kept; ``candidates``: every candidate tried, with
    its validation metrics, in the order tried (the run's own values first)."""

    chosen: dict[str, Any]
    metric: str
    candidates: list[dict[str, Any]]

    def record(self) -> dict[str, Any]:
        """What :data:`CHOICE_FILE` holds."""
        return {"metric": self.metric, "tie_break": TIE_BREAK, "chosen": self.chosen, "candidates": self.candidates}


def check_options(options: Mapping[str, Sequence[Any]], config: Config, source: str = "scoring") -> None:
    """Every key a scoring key, every value valid for ``config``: errors name the key."""
    for key, values in options.items():
        if key not in Config.SCORING_KEYS:
            raise ConfigError(f"{source}: key '{key}' is not a scoring key ({', '.join(Config.SCORING_KEYS)}); "
                              "only keys that change no weight are chosen after training")
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"{source}: key '{key}' needs a non-empty list of values")
        for value in values:
            try:
                config.replace(**{key: value})
            except ConfigError as exc:
                raise ConfigError(f"{source}: key '{key}': value {value!r} is invalid: {exc}") from None


def candidates(options: Mapping[str, Sequence[Any]], config: Config) -> list[dict[str, Any]]:
    """Every combination of ``options``' values, the config's own values first in each key."""
    keys = list(options)
    ordered = [[getattr(config, k), *(v for v in options[k] if v != getattr(config, k))] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*ordered)]


def _value(metrics: Mapping[str, float], key: str) -> float:
    v = metrics.get(key, float("nan"))
    return v if isinstance(v, float) and math.isfinite(v) else -math.inf


def apply_scoring(model: nn.Module, config: Config) -> None:
    """Read ``model`` as ``config``'s scoring keys say, in place; the score normalisation is
    marked as not computed (``training.score_set(..., calibrate=True)`` computes it)."""
    model.scorer.read_as(config, mss=model.spec.mss)
    model.scorer.norm_images.zero_()


@torch.no_grad()
def choose_scoring(model: nn.Module, val_set: EvalDataset, device: torch.device | str,
                   options: Mapping[str, Sequence[Any]], metric: str, config: Config) -> ScoringChoice:
    """Score ``val_set`` (validation images) with ``model`` every way ``options`` lists and keep
    the best by validation ``metric`` (e.g. ``val_pixel_ap``), then image AUROC. The model's
    scorer is left as the chosen candidate says (:func:`apply_scoring`). -> the choice.

    One forward pass over the validation images per distinct ``map_heads_weight``; the image
    scores of the other keys are computed from those maps as inference computes them."""
    check_options(options, config)
    name = metric.removeprefix("val_")
    labels, masks = val_set.labels.numpy(), val_set.masks[:, 0].numpy()
    good = int((labels == 0).sum())
    maps: dict[float, tuple[np.ndarray, dict[str, float]]] = {}
    tried: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], int] | None = None
    for combo in candidates(options, config):
        cfg = config.replace(**combo)
        if cfg.score_norm != "none" and good < 2:
            continue
        weight = cfg.map_heads_weight if model.spec.mss else 0.0
        if weight not in maps:
            apply_scoring(model, cfg.replace(score_norm="none"))
            _, amaps = predict(model, val_set.images, device=device)
            maps[weight] = (amaps, compute(np.zeros(len(amaps)), labels, amaps, masks))   # pixel metrics
        amaps, pixel = maps[weight]
        scores = Scorer.for_config(cfg, mss=model.spec.mss).calibrate(amaps, labels)
        found = {**pixel, "image_auroc": auroc(scores, labels), "image_f1max": f1_max(scores, labels)[0]}
        tried.append({"values": combo, **{f"val_{k}": v for k, v in found.items()}})
        rank = (_value(found, name), _value(found, TIE_BREAK))
        if best is None or rank > best[0]:
            best = (rank, len(tried) - 1)
    if best is None:
        raise ConfigError("scoring: no candidate can be scored on this validation split "
                          f"({good} good image(s); score_norm pixel needs 2)")
    chosen = dict(tried[best[1]]["values"])
    apply_scoring(model, config.replace(**chosen))
    return ScoringChoice(chosen, metric, tried)
