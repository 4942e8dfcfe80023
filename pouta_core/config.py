"""One typed configuration for the model, its training and its synthesis.

A :class:`Config` is a frozen, flat dataclass: flat so that ``key=value`` overrides, MLflow
params and search spaces all use the same names. Every field declares its allowed values in
``metadata`` and is validated when the object is built, scikit-learn style: the error names
the key and the allowed range, and the internals then trust the values.

    cfg = Config.from_preset("tiny", overrides=["lr=1e-3", "variant=vanilla"])
    cfg.to_yaml("run/config.yaml")
    same = Config.from_yaml("run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pouta_core.variants import VARIANTS as VARIANT_TABLE

VARIANTS = tuple(VARIANT_TABLE)   # the names, for validation and the CLI


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type, or out of range."""


def _spec(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    multiple_of: int | None = None,
    help: str,
) -> dict[str, Any]:
    return {
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "choices": choices,
        "multiple_of": multiple_of,
        "help": help,
    }


@dataclass(frozen=True)
class Config:
    """Every hyperparameter of POUTA and of the vanilla (DRAEM) baseline.

    Defaults are the paper's (§4.1) at 224 px with the ``paper`` preset's widths.
    """

    # --- model -------------------------------------------------------------------------
    variant: str = field(
        default="pouta",
        metadata=_spec(choices=VARIANTS, help="model variant (paper Table 4)"),
    )
    image_size: int = field(
        default=224,
        metadata=_spec(
            ge=32, le=4096, multiple_of=32,
            help="square input size in pixels; a multiple of 32 (the U-Net pools 5 times)",
        ),
    )
    rec_width: int = field(
        default=60,
        metadata=_spec(ge=1, le=1024, help="reconstructive network base width w (w..8w)"),
    )
    disc_width: int = field(
        default=46,
        metadata=_spec(ge=1, le=1024, help="vanilla U-Net discriminator base width (w..8w)"),
    )
    fcm_width: int = field(
        default=32,
        metadata=_spec(ge=1, le=1024, help="channels of every F_Ci in the POUTA variants"),
    )
    fcm_depth: int = field(
        default=1,
        metadata=_spec(ge=1, le=4, help="Conv3x3-BN-ReLU blocks in each FCM (the paper does not say)"),
    )
    detach_features: bool = field(
        default=False,
        metadata=_spec(
            help="stop discriminative gradients at the reconstructive features/reconstruction"
        ),
    )
    # --- options that make the contrast necessary (issue 18; off: the paper's reading) ---
    fcm_input: str = field(
        default="concat",
        metadata=_spec(
            choices=("concat", "contrast", "encoder", "decoder"),
            help="what each FCM sees: concat(F_E, F_D) (paper), or contrast: a shared 1x1 projection "
            "phi of both sides and their difference, [phi(F_E), phi(F_D), |phi(F_E) - phi(F_D)|]; "
            "encoder / decoder (ablations): one side only, given twice (the same parameter count)",
        ),
    )
    detach_encoder: bool = field(
        default=False,
        metadata=_spec(help="stop discriminative gradients at the encoder features only (the decoder "
                       "features still receive them), so the encoder does not become a segmenter"),
    )
    lambda_consistency: float = field(
        default=0.0,
        metadata=_spec(ge=0.0, le=100.0, help="weight of a feature-consistency loss, 1 - cos(F_Ei, F_Di) "
                       "on pixels without synthetic anomaly, so that the two sides of normal content agree"),
    )
    self_source_ratio: float = field(
        default=0.0,
        metadata=_spec(ge=0.0, le=1.0, help="share of anomaly sources made of the image's own shifted or "
                       "rotated copy alone (no unrelated image): locally normal content that only the "
                       "contrast reveals"),
    )
    rec_warmup_epochs: int = field(
        default=0,
        metadata=_spec(ge=0, le=100_000, help="staged training: the first N epochs train the reconstructive "
                       "network alone (reconstruction loss only, the discriminator untouched); after them "
                       "training goes on as configured (with detach_features: true, the discriminator then "
                       "learns on features it cannot change)"),
    )
    init: str = field(
        default="draem",
        metadata=_spec(
            choices=("draem", "torch"),
            help="weight init: DRAEM's N(0, 0.02) convs / N(1, 0.02) BN, or PyTorch defaults",
        ),
    )
    # --- anomaly map and image score (issue 19; defaults: the paper's; model/scoring.py) --
    map_heads_weight: float = field(
        default=0.0,
        metadata=_spec(ge=0.0, le=1.0, help="anomaly map = (1 - w) fused map + w mean of the MSS heads' "
                       "maps; 0 the paper's fused map, 0.2 the plain mean of all five; variants without "
                       "MSS ignore it"),
    )
    image_score: str = field(
        default="pooled_max",
        metadata=_spec(choices=("pooled_max", "topk_mean"),
                       help="image score: max of the 21x21 average pool of the map (paper), or the mean "
                       "of its image_score_topk largest share of pixels"),
    )
    image_score_topk: float = field(
        default=0.01,
        metadata=_spec(gt=0.0, le=1.0, help="share of the map's pixels topk_mean averages"),
    )
    image_score_pool: int = field(
        default=21,
        metadata=_spec(ge=1, le=255, help="side of the average pool whose max is the pooled_max image score "
                       "(odd; the paper's 21)"),
    )
    score_norm: str = field(
        default="none",
        metadata=_spec(choices=("none", "pixel"),
                       help="pixel: standardise the map the score reads, per pixel, by the validation good "
                       "images' statistics (stored in the checkpoint), so that spots bright on every good "
                       "image do not decide the score"),
    )
    # --- the decision a served model makes (issue 47; the paper reports none) ----------
    threshold_policy: str = field(
        default="fpr:0.01",
        metadata=_spec(help="how the stored image threshold is set on the validation images: fpr:<rate> the "
                       "lowest that flags at most <rate> of the good ones (a false-alarm budget; the default "
                       "fpr:0.01), or f1 the F1-max (where defects are the majority and the model weak, "
                       "that can be 'everything is anomalous')"),
    )
    # --- loss (eq. 1, 5-8) -------------------------------------------------------------
    lambda_1: float = field(default=0.4, metadata=_spec(ge=0.0, le=100.0, help="MSS weight, scale 1"))
    lambda_2: float = field(default=0.3, metadata=_spec(ge=0.0, le=100.0, help="MSS weight, scale 2"))
    lambda_3: float = field(default=0.2, metadata=_spec(ge=0.0, le=100.0, help="MSS weight, scale 3"))
    lambda_4: float = field(default=0.1, metadata=_spec(ge=0.0, le=100.0, help="MSS weight, scale 4"))
    focal_alpha: float | None = field(
        default=None,
        metadata=_spec(
            ge=0.0, le=1.0,
            help="focal loss class balance (Lin et al.): anomalous pixels weigh alpha, normal "
            "pixels 1 - alpha; null (default, the paper's alpha_t = 1) weighs every pixel 1",
        ),
    )
    focal_gamma: float = field(
        default=2.0, metadata=_spec(ge=0.0, le=10.0, help="focal loss gamma")
    )
    # --- optimisation ------------------------------------------------------------------
    lr: float = field(default=2e-4, metadata=_spec(gt=0.0, le=1.0, help="Adam learning rate"))
    scale_lr: str = field(
        default="none",
        metadata=_spec(choices=("none", "linear"),
                       help="with several workers (DDP): none keeps lr; linear multiplies it by the number of "
                       "workers (the global batch grows as much)"),
    )
    batch_size: int = field(default=8, metadata=_spec(ge=1, le=4096, help="images per step"))
    epochs: int = field(default=600, metadata=_spec(ge=1, le=100_000, help="training epochs"))
    lr_milestones: tuple[int, ...] = field(
        default=(480, 540),
        metadata=_spec(
            ge=1, help="epochs at which the LR is multiplied by lr_factor; increasing, <= epochs"
        ),
    )
    lr_factor: float = field(
        default=0.2, metadata=_spec(gt=0.0, le=1.0, help="LR multiplier at each milestone")
    )
    seed: int = field(default=0, metadata=_spec(ge=0, le=2**32 - 1, help="random seed"))
    eval_every: int = field(
        default=10, metadata=_spec(ge=1, le=100_000, help="evaluate (and report) every N epochs")
    )
    # *Decision* (issue 28): 50, not every evaluation. At the paper preset a checkpoint is
    # about 180 MB (weights and Adam state): every 10 epochs made 60 of them per 600-epoch
    # run, 10 GB written to shared storage per trial; every 50 makes 12 and loses at most 50
    # epochs (8% of the schedule) to a crash. The final epoch is always saved.
    checkpoint_every: int = field(
        default=50, metadata=_spec(ge=1, le=100_000, help="write a checkpoint every N epochs (and at the "
                                   "last); in sweeps, rounded up to a multiple of eval_every")
    )
    amp: bool = field(default=True, metadata=_spec(help="mixed precision on CUDA (ignored on CPU)"))
    amp_dtype: str = field(
        default="auto",
        metadata=_spec(choices=("auto", "float16", "bfloat16"),
                       help="autocast type when amp is on: auto is bfloat16 where the GPU supports it (Ampere "
                       "and later; no loss scaling), else float16 with loss scaling"),
    )
    channels_last: bool = field(
        default=False,
        metadata=_spec(help="train with the model and batches in channels_last memory format (faster "
                       "convolutions on some GPUs; measure with pouta bench train)"),
    )
    compile: bool = field(
        default=False,
        metadata=_spec(help="torch.compile the model for training (the first steps pay the compilation; "
                       "measure with pouta bench train)"),
    )
    # --- anomaly synthesis (§3.1) ------------------------------------------------------
    clean_ratio: float = field(
        default=0.5, metadata=_spec(ge=0.0, le=1.0, help="share of training samples left clean")
    )
    perlin_threshold: float = field(
        default=0.5, metadata=_spec(gt=0.0, lt=1.0, help="Perlin noise binarisation threshold")
    )
    perlin_max_scale_exp: int = field(
        default=6, metadata=_spec(ge=1, le=8, help="Perlin scale 2^k per axis, k drawn in [0, this)")
    )
    beta_min: float = field(
        default=0.0, metadata=_spec(ge=0.0, le=1.0, help="lowest blend weight of the original image")
    )
    beta_max: float = field(
        default=0.8, metadata=_spec(ge=0.0, le=1.0, help="highest blend weight of the original image")
    )
    # per_sample again since 2026-12-01 (issue 33): batched, even with its masks fixed, did not
    # pass the quality gate (bench/quality_gate.sh) on every category; docs/experiments.md.
    synthesis: str = field(
        default="per_sample",
        metadata=_spec(
            choices=("batched", "per_sample"),
            help="where anomalies are made: one sample at a time in the DataLoader's workers (per_sample, "
            "the default), or for the whole batch at once on the training device (batched: faster, not yet "
            "non-inferior on every benchmark category, docs/experiments.md)",
        ),
    )
    foreground_threshold: float | None = field(
        default=None,
        metadata=_spec(
            gt=0.0, lt=1.0,
            help="keep anomalies on pixels whose grey level differs from the border's median by "
            "more than this; null (default) puts them anywhere, as for textures",
        ),
    )

    bit_depth: str = field(
        default="auto",
        metadata=_spec(
            choices=("auto", "8", "10", "12", "14", "16"),
            help="bits used in 16-bit grey image files (a 12-bit camera writes 0..4095): samples are scaled by "
            "2^(bits-8); auto finds them from the training images' largest sample, rounded up to an even "
            "depth, and records them with the model (16 when no training image is 16-bit)",
        ),
    )

    # --- model selection (docs/orchestration.md, "How models are chosen") ---------------
    val_split: str = field(
        default="auto",
        metadata=_spec(
            choices=("auto", "from_test", "synthetic", "none"),
            help="images every choice is made on: part of the test split (from_test), held-out good "
            "images with synthetic anomalies (synthetic), the test split itself (none); auto: "
            "from_test when the test split has good and anomalous images, else synthetic",
        ),
    )
    val_ratio: float = field(
        default=0.3,
        metadata=_spec(gt=0.0, lt=1.0, help="share of the test split (from_test) or of the good "
                       "training images (synthetic) that goes to validation"),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_value(f, getattr(self, f.name)))
        if self.beta_min > self.beta_max:
            raise ConfigError(
                f"config key 'beta_min': must be <= beta_max ({self.beta_max}), got {self.beta_min}"
            )
        if self.image_score_pool % 2 == 0:
            raise ConfigError("config key 'image_score_pool': must be odd (a centred pool), "
                              f"got {self.image_score_pool}")
        self.false_alarm_budget()   # checks threshold_policy
        if self.rec_warmup_epochs >= self.epochs:
            raise ConfigError(
                f"config key 'rec_warmup_epochs': must be < epochs ({self.epochs}), got {self.rec_warmup_epochs}"
            )
        ms = self.lr_milestones
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise ConfigError(f"config key 'lr_milestones': must be strictly increasing, got {list(ms)}")
        if ms and ms[-1] > self.epochs:
            raise ConfigError(
                f"config key 'lr_milestones': every milestone must be <= epochs ({self.epochs}), "
                f"got {list(ms)}"
            )

    # --- construction ------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | None = None) -> Config:
        """Build from a mapping; unknown keys are rejected with the closest valid key.
        ``source`` (a file name, a preset) prefixes error messages."""
        prefix = f"{source}: " if source else ""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{prefix}expected a mapping of config keys, got {type(values).__name__}")
        unknown = [k for k in values if k not in cls.keys()]
        if unknown:
            key = unknown[0]
            hint = difflib.get_close_matches(str(key), cls.keys(), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{prefix}unknown config key '{key}'{extra}")
        try:
            return cls(**dict(values))
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None

    @classmethod
    def from_preset(cls, name: str = "paper", overrides: Iterable[str] = ()) -> Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}': choose one of {sorted(PRESETS)}")
        return cls._with_overrides(PRESETS[name], overrides, f"preset '{name}'")

    @classmethod
    def _with_overrides(cls, base: Mapping[str, Any], overrides: Iterable[str], source: str) -> Config:
        """``base`` (a preset, a file) with ``key=value`` overrides; an error about a key an
        override set blames that override (``--set key=value``), else ``source``."""
        items = list(overrides)
        parsed = parse_overrides(items)
        try:
            return cls.from_dict({**base, **parsed})
        except ConfigError as exc:
            found = re.search(r"config key '([^']+)'", str(exc))
            if found and found.group(1) in parsed:
                item = next(i for i in reversed(items) if i.partition("=")[0].strip() == found.group(1))
                raise ConfigError(f"--set {item}: {exc}") from None
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], overrides: Iterable[str] = (), *, preset: str | None = None
    ) -> Config:
        """Load a YAML file (``safe_load``) of config keys over a preset, then ``overrides``.

        The preset is the file's ``preset:`` key if it has one, else ``preset``, else none.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", preset)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"{path}: unknown preset '{preset}': choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[preset]) if preset else {}
        return cls._with_overrides({**base, **data}, overrides, str(path))

    # How a run computes, not what it learns: a resume may change them (``training.restore``).
    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ("amp", "amp_dtype", "channels_last", "compile", "checkpoint_every")
    # How a trained model's map and score are read, not what it learns: ``pouta evaluate
    # --set`` may change them on a trained checkpoint.
    SCORING_KEYS: ClassVar[tuple[str, ...]] = ("map_heads_weight", "image_score", "image_score_topk",
                                               "image_score_pool", "score_norm")

    def false_alarm_budget(self) -> float | None:
        """``threshold_policy`` read: the rate of ``fpr:<rate>``, None for ``f1``."""
        policy = self.threshold_policy
        if policy == "f1":
            return None
        kind, _, rate = policy.partition(":")
        try:
            value = float(rate) if kind == "fpr" else None
        except ValueError:
            value = None
        if value is None or not 0.0 < value < 1.0:
            raise ConfigError(f"config key 'threshold_policy': expected f1 or fpr:<rate> with 0 < rate < 1 "
                              f"(fpr:0.01 flags at most 1% of good validation images), got {policy!r}")
        return value

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**self.to_dict(), **changes})

    # --- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        return out

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temporary file in the same folder, then rename."""
        from pouta_core.files import atomic_write

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write(path, lambda fh: fh.write(text.encode()))


# Presets are plain override dicts so that they read like config files.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's schedule at 224 px. Widths are ours (the paper gives none): with
    # rec_width=60, disc_width=46, fcm_width=32 POUTA has 15.02M parameters and vanilla
    # 29.12M, the paper's Table 5 proportion (15.02M vs 28.68M). See docs/model.md.
    "paper": {},
    # For tests and the CPU demo: 64 px, narrow networks, a short schedule (5 to 6 minutes
    # per category and model on 2 CPU cores with the demo data). 200 epochs, not 100: at 100
    # POUTA localised tiles' thin scratches worse than vanilla (docs/experiments.md, 2026-11-28).
    "tiny": {
        "image_size": 64,
        "rec_width": 16,
        "disc_width": 16,
        "fcm_width": 16,
        "epochs": 200,
        "lr_milestones": [160, 180],
        "lr": 1e-3,
    },
}


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML scalars or lists (``lr_milestones=[8,9]``)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: value is not a valid YAML scalar or list") from None
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _field_types() -> dict[str, Any]:
    """Config's field types, evaluated once: ``get_type_hints`` compiles every annotation of
    the class (strings, under ``from __future__ import annotations``) on each call, and a
    Config checks all its fields whenever one is made (a sweep's driver makes several per
    trial: a third of its CPU per trial before this)."""
    return typing.get_type_hints(Config)


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    """Coerce ``value`` to the field's type where lossless, then check its range."""
    key, meta = f.name, f.metadata
    tp = _field_types()[key]
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list of integers, got {value!r}")
        return tuple(_check_scalar(key, int, v, meta) for v in value)
    if origin in (typing.Union, types.UnionType):  # `X | None`: null is allowed
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return _check_scalar(key, tp, value, meta)


def _check_scalar(key: str, tp: type, value: Any, meta: Mapping[str, Any]) -> Any:
    bad_type = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad_type
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad_type
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept what float() reads exactly.
            try:
                value = float(value)
            except ValueError:
                raise bad_type from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_type
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be finite, got {value!r}")
    elif tp is str:
        if isinstance(value, int) and not isinstance(value, bool) and any(
                str(c).isdigit() for c in meta.get("choices") or ()):
            value = str(value)    # bit_depth=12 reads as an integer; the choices say if it is one
        if not isinstance(value, str):
            raise bad_type
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(
            f"config key '{key}': must be one of {', '.join(map(str, meta['choices']))}; got {value!r}"
        )
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    if (ge is not None and value < ge or gt is not None and value <= gt
            or le is not None and value > le or lt is not None and value >= lt):
        lo = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "(-inf")
        hi = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "inf)")
        raise ConfigError(f"config key '{key}': must be in {lo}, {hi}, got {value!r}")
    mult = meta.get("multiple_of")
    if mult and value % mult:
        raise ConfigError(f"config key '{key}': must be a multiple of {mult}, got {value!r}")
    return value
