"""Checkpoints: one ``checkpoint.pt`` of plain tensors and numbers, written atomically and
loaded with ``torch.load(weights_only=True)``; ``config.yaml`` and ``metrics.json`` beside it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pouta_core.config import Config, ConfigError, parse_overrides
from pouta_core.files import atomic_write, write_json  # noqa: F401 - re-exported
from pouta_core.model import AnomalyDetector, build_model

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.json"
VAL_FILES = "val_files.json"   # the validation split the run was chosen on (pouta_core.data.validation)
FORMAT = 1


# What only resuming training needs: with Adam, about twice the weights again.
TRAINING_STATE = ("optimizer", "scheduler", "scaler")


BIT_DEPTH = "bit_depth"   # the bits 16-bit grey files were scaled by in training (Config.bit_depth, resolved)


def bit_depth(state: dict[str, Any]) -> int:
    """The bit depth a model's 16-bit grey inputs are scaled by; 16 (the high byte) for
    checkpoints written before ``bit_depth`` existed, which is how they were trained."""
    return int(state.get(BIT_DEPTH, 16))


def inference_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a model to use, not to resume: without :data:`TRAINING_STATE`.
    :func:`load_model` reads it as it reads a full checkpoint."""
    return {k: v for k, v in state.items() if k not in TRAINING_STATE}


def keep_for_inference(path: str | Path) -> int:
    """Rewrite the checkpoint at ``path`` (a file or its folder) as :func:`inference_state`,
    atomically -> bytes saved (0 when it held no training state)."""
    path = Path(path)
    path = path / CHECKPOINT if path.is_dir() else path
    before = path.stat().st_size
    state = load_state(path)
    if not any(k in state for k in TRAINING_STATE):
        return 0
    save_checkpoint(path.parent, {k: v for k, v in inference_state(state).items() if k != "format"})
    return before - path.stat().st_size


def save_checkpoint(out_dir: Path, state: dict[str, Any], *, before_replace=None) -> Path:
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda fh: torch.save({"format": FORMAT, **state}, fh), before_replace=before_replace)
    return path


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``checkpoint.pt`` (or a folder holding one) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ConfigError(f"{path}: not a readable POUTA checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise ConfigError(f"{path}: not a POUTA checkpoint (format {FORMAT})")
    return state


# Buffers added after checkpoints were first written; a checkpoint without them gets the
# module's defaults (the scorer's: no score normalisation computed yet).
OPTIONAL_PREFIXES = ("scorer.",)


def load_weights(model: AnomalyDetector, weights: dict[str, torch.Tensor], path: Path | str) -> None:
    """``load_state_dict``, with a one-line error naming the first tensor that does not fit."""
    expected = model.state_dict()
    weights = {**{k: v for k, v in expected.items() if k.startswith(OPTIONAL_PREFIXES)}, **weights}
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{path}: weights do not fit the model its config describes ({len(wrong)} tensors; "
                          f"{k} is {tuple(weights[k].shape)}, the model has {tuple(expected[k].shape)})")
    if missing or unexpected:
        k = (missing or unexpected)[0]
        raise ConfigError(f"{path}: weights do not fit the model its config describes "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {k})")
    model.load_state_dict(weights)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", *, scoring: Iterable[str] = ()
               ) -> tuple[AnomalyDetector, Config, dict[str, Any]]:
    """-> (model in eval mode, its config, the checkpoint state). ``scoring``: ``key=value``
    overrides of ``Config.SCORING_KEYS`` only (how the trained model's map and score are read);
    when they change anything, the stored score normalisation no longer applies and is
    dropped (``pouta_core.training.score_set(..., calibrate=True)`` computes it again)."""
    state = load_state(path, map_location)
    config = Config.from_dict(state["config"], source=str(path))
    scoring = list(scoring)
    changed = parse_overrides(scoring)
    other = [k for k in changed if k not in Config.SCORING_KEYS]
    if other:
        raise ConfigError(f"--set {other[0]}: a trained model's config cannot change; only its scoring keys "
                          f"can ({', '.join(Config.SCORING_KEYS)})")
    rescored = config._with_overrides(config.to_dict(), scoring, str(path)) if scoring else config
    model = build_model(rescored)
    load_weights(model, state["model"], path)
    if rescored != config:
        model.scorer.norm_images.zero_()
    return model.to(map_location).eval(), rescored, state


def require_calibrated(model: AnomalyDetector, path: str | Path) -> None:
    """Refuse to score with ``score_norm`` when the checkpoint holds no statistics for it."""
    if not model.scorer.calibrated:
        raise ConfigError(f"{path}: score_norm={model.scorer.norm} but the checkpoint holds no statistics "
                          "of validation good images; pouta evaluate computes them, train to store them")
