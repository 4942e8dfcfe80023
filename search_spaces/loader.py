"""Declarative search spaces: YAML files of config keys and their distributions.

    description: MSS weights (eq. 6)
    space:
      lambda_1: {distribution: uniform, low: 0.0, high: 1.0}
      variant:  {distribution: grid, values: [vanilla, pouta]}
    fixed:            # optional: config overrides applied to every trial
      epochs: 60
    reference:        # optional: the sweep's default trial (what its choice must beat), when
      lambda_1: 0.4   #   it is not the base config's values of the searched keys
    scoring:          # optional: scoring keys (Config.SCORING_KEYS), chosen after training on
      image_score: [pooled_max, topk_mean]   # each searched trial's own validation images

Distributions: ``uniform`` / ``loguniform`` (low, high; floats), ``int`` (low, high, optional
step; integers, inclusive), ``choice`` (values; sampled), ``grid`` (values; every value is
run). Every key must be a config key, and every value a search could produce must be valid
for it: the file is checked against the config's own validation when it is loaded. The
scoring keys change no weight: they are never trials of their own (``space:`` refuses them);
``scoring:`` lists their values, and every searched trial reads its trained model each way and
keeps the best on its validation images (:mod:`pouta_core.scoring_choice`): the weights produced
once, used several ways, for no more trials.
Files are read with ``yaml.safe_load``: they carry data, never code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pouta_core.config import Config, ConfigError

DISTRIBUTIONS = {
    "uniform": {"low", "high"},
    "loguniform": {"low", "high"},
    "int": {"low", "high", "step"},
    "choice": {"values"},
    "grid": {"values"},
}
SPACES_DIR = Path(__file__).resolve().parent
# Trials are compared on their validation metrics: searching the validation set itself
# would let a trial win by choosing easier images.
SELECTION_KEYS = ("val_split", "val_ratio")


class SearchSpaceError(ConfigError):
    """A search space file is malformed; the message names the file and key."""


@dataclass(frozen=True)
class Dimension:
    key: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    values: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        """The values a search can reach at its edges (all of them for choice/grid)."""
        if self.distribution in ("choice", "grid"):
            return list(self.values)
        return [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    dimensions: tuple[Dimension, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    reference: dict[str, Any] = field(default_factory=dict)   # the default trial's values of searched keys
    scoring: dict[str, tuple[Any, ...]] = field(default_factory=dict)   # chosen after training, per trial

    @property
    def has_grid(self) -> bool:
        return any(d.distribution == "grid" for d in self.dimensions)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]


def _err(path: Path, key: str | None, msg: str) -> SearchSpaceError:
    where = f"{path}: key '{key}'" if key else f"{path}"
    return SearchSpaceError(f"{where}: {msg}")


def _number(path: Path, key: str, name: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise _err(path, key, f"'{name}' must be {kind}, got {value!r}")
    return value


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    if key not in Config.keys():
        raise _err(path, key, "is not a config key")
    if key in SELECTION_KEYS:
        raise _err(path, key, "chooses the validation images trials are compared on; it cannot be searched")
    if key in Config.SCORING_KEYS:
        raise _err(path, key, "changes no weight: list its values under 'scoring:' (chosen after training on each "
                              "trial's validation images, for no more trials)")
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise _err(path, key, "expected a mapping with a 'distribution'")
    dist = spec["distribution"]
    if dist not in DISTRIBUTIONS:
        raise _err(path, key, f"unknown distribution '{dist}'; choose one of {', '.join(DISTRIBUTIONS)}")
    extra = set(spec) - DISTRIBUTIONS[dist] - {"distribution"}
    if extra:
        raise _err(path, key, f"unexpected field(s) {', '.join(sorted(extra))} for {dist}")
    if dist in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise _err(path, key, f"{dist} needs a non-empty list of 'values'")
        # Optuna's categorical choices must be scalars; lists are carried as YAML strings.
        return Dimension(key, dist, values=tuple(values))
    for name in ("low", "high"):
        if name not in spec:
            raise _err(path, key, f"{dist} needs '{name}'")
    integer = dist == "int"
    low = _number(path, key, "low", spec["low"], integer)
    high = _number(path, key, "high", spec["high"], integer)
    if not low < high:
        raise _err(path, key, f"'low' ({low}) must be below 'high' ({high})")
    if dist == "loguniform" and low <= 0:
        raise _err(path, key, f"loguniform needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(path, key, "step", step, True)
        if step < 1:
            raise _err(path, key, f"'step' must be >= 1, got {step}")
    return Dimension(key, dist, low=low, high=high, step=step)


def load(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a search space file. ``base`` is the config the trials start from
    (the preset); every edge value of every dimension must make a valid config with it."""
    path = Path(path)
    if not path.is_file() and not path.suffix and (SPACES_DIR / f"{path}.yaml").is_file():
        path = SPACES_DIR / f"{path}.yaml"       # `--space mss_lambdas` finds the bundled file
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise _err(path, None, f"cannot read search space ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise _err(path, None, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict) or not data["space"]:
        raise _err(path, None, "expected a mapping with a non-empty 'space' mapping")
    unknown = set(data) - {"space", "fixed", "description", "reference", "scoring"}
    if unknown:
        raise _err(path, None, f"unknown top-level key(s) {', '.join(sorted(unknown))}")
    dims = tuple(_dimension(path, str(k), v) for k, v in data["space"].items())
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _err(path, None, "'fixed' must be a mapping of config keys")
    reference = data.get("reference") or {}
    if not isinstance(reference, dict):
        raise _err(path, None, "'reference' must be a mapping of searched keys to values")
    searched = {d.key for d in dims}
    for key in reference:
        if key not in searched:
            raise _err(path, str(key), "is in 'reference' but not searched: a reference point names values of "
                                       "the searched keys (other keys go in 'fixed')")
    scoring = data.get("scoring") or {}
    if not isinstance(scoring, dict):
        raise _err(path, None, "'scoring' must be a mapping of scoring keys to lists of values")
    space = SearchSpace(path, dims, dict(fixed), str(data.get("description", "")), dict(reference),
                        {str(k): tuple(v) if isinstance(v, list) else v for k, v in scoring.items()})
    _check_against_config(space, base or Config())
    return space


def _check_against_config(space: SearchSpace, base: Config) -> None:
    """Every edge of every dimension, with the fixed keys and the other dimensions at their
    lowest edge, must build a valid Config; errors name the file and key."""
    try:
        start = base.replace(**space.fixed)
    except ConfigError as exc:
        raise _err(space.path, None, f"in 'fixed': {exc}") from None
    low = {d.key: d.extremes()[0] for d in space.dimensions}
    for dim in space.dimensions:
        for value in dim.extremes():
            trial = {**low, dim.key: value}
            try:
                start.replace(**trial)
            except ConfigError as exc:
                raise _err(space.path, dim.key, f"value {value!r} is invalid: {exc}") from None
    try:
        start.replace(**space.reference)
    except ConfigError as exc:
        raise _err(space.path, None, f"in 'reference': {exc}") from None
    for key, values in space.scoring.items():
        if key not in Config.SCORING_KEYS:
            raise _err(space.path, key, f"is in 'scoring' but not a scoring key ({', '.join(Config.SCORING_KEYS)}); "
                                        "keys that change the weights are searched under 'space:'")
        if not isinstance(values, tuple) or not values:
            raise _err(space.path, key, "'scoring' needs a non-empty list of values")
        for value in values:
            try:
                start.replace(**{key: value})
            except ConfigError as exc:
                raise _err(space.path, key, f"scoring value {value!r} is invalid: {exc}") from None


def bundled() -> list[Path]:
    return sorted(SPACES_DIR.glob("*.yaml"))
