"""The validation split: the images every choice is made on (best epoch's threshold, best
trial, promotion), kept apart from the test images that are only reported.

``from_test``  a stratified part of the test split (per defect type, good images included).
``synthetic``  for categories without defect images: a part of the *good training images*
               is held out (never trained on) and shown once clean and once with a synthetic
               anomaly drawn by a fixed generator and fixed settings, independent of the
               trial's seed and searched synthesis keys, so every trial sees the same set.
``none``       validation = test: the old, optimistic behaviour, only on request.
``auto``       ``from_test`` when the test split has good and anomalous images, else
               ``synthetic``.

Which file goes where depends only on its path relative to the data root (a hash ranks the
files of each stratum), never on the trial or the run: every trial of a sweep, and a
retraining months later on the same files, sees the same split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pouta_core.config import Config
from pouta_core.data.datasets import EvalDataset, sample_seed
from pouta_core.data.errors import DataError
from pouta_core.data.layouts import Sample, Split
from pouta_core.synthesis import AnomalySynthesizer

VAL_SPLITS = ("auto", "from_test", "synthetic", "none")
# The synthetic validation set's own seed and synthesis settings: fixed, so that a sweep
# searching beta_max or perlin_threshold does not also change the images it is judged on.
SYNTHETIC_VAL_SEED = 917
_SYNTHESIS_KEYS = ("perlin_threshold", "perlin_max_scale_exp", "beta_min", "beta_max")


@dataclass(frozen=True)
class SelectionSplit:
    """Samples per role. ``mode`` is the resolved split (never ``auto``)."""

    mode: str
    train: list[Sample]
    val: list[Sample]                 # from_test / none: labelled images; synthetic: held-out good images
    test: list[Sample] = field(default_factory=list)

    def val_files(self, root: str | Path) -> list[str]:
        """The validation images' paths relative to ``root``, as written into run folders."""
        return [_relative(s.path, Path(root)) for s in self.val]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _ranked(samples: list[Sample], root: Path) -> list[Sample]:
    """A fixed pseudo-random order: by the hash of the path relative to the data root."""
    return sorted(samples, key=lambda s: hashlib.sha256(f"pouta-val:{_relative(s.path, root)}".encode()).digest())


def _take(n: int, ratio: float) -> int:
    return min(n, int(n * ratio + 0.5))


def has_labelled_test(split: Split) -> bool:
    labels = {s.label for s in split.test}
    return labels == {0, 1}


def split_for_selection(split: Split, root: str | Path, mode: str = "auto", ratio: float = 0.3,
                        where: str = "") -> SelectionSplit:
    """Divide ``split`` into train / validation / test for ``mode`` (see the module doc)."""
    if mode not in VAL_SPLITS:
        raise DataError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got '{mode}'")
    root = Path(root)
    where = where or str(root)
    if mode == "auto":
        mode = "from_test" if has_labelled_test(split) else "synthetic"
    if mode == "none":
        return SelectionSplit("none", split.train, split.test, split.test)
    if mode == "from_test":
        if not has_labelled_test(split):
            raise DataError(f"{where}: val_split=from_test needs good and anomalous test images; "
                            "use val_split=synthetic for a category without defect images")
        strata: dict[tuple[int, str], list[Sample]] = {}
        for s in split.test:
            strata.setdefault((s.label, s.defect), []).append(s)
        val: list[Sample] = []
        for key in sorted(strata):
            ranked = _ranked(strata[key], root)
            val.extend(ranked[:_take(len(ranked), ratio)])
        chosen = {s.path for s in val}
        test = [s for s in split.test if s.path not in chosen]
        for part, name in ((val, "validation"), (test, "test")):
            if {s.label for s in part} != {0, 1}:
                raise DataError(f"{where}: val_ratio={ratio} leaves the {name} part without a good and an "
                                f"anomalous image ({len(split.test)} test images); change val_ratio or use "
                                "val_split=synthetic")
        return SelectionSplit("from_test", split.train, sorted(val, key=lambda s: str(s.path)), test)
    # synthetic: hold out good training images
    ranked = _ranked(split.train, root)
    n_val = max(1, _take(len(ranked), ratio))
    if len(ranked) - n_val < 2:
        raise DataError(f"{where}: val_split=synthetic with val_ratio={ratio} leaves fewer than 2 of "
                        f"{len(ranked)} good training images to train on")
    held = {s.path for s in ranked[:n_val]}
    train = [s for s in split.train if s.path not in held]
    val = [s for s in split.train if s.path in held]
    test = split.test if has_labelled_test(split) else []
    return SelectionSplit("synthetic", train, val, test)


def synthetic_validation(images: torch.Tensor, config: Config) -> EvalDataset:
    """Held-out good images (N, 3, S, S) uint8 -> 2N labelled images: each once clean and once
    with a synthetic anomaly (procedural source, the default synthesis settings, a fixed seed).
    Only ``foreground_threshold`` is taken from ``config``: it says where anomalies can be."""
    defaults = Config()
    settings = config.replace(clean_ratio=0.0, **{k: getattr(defaults, k) for k in _SYNTHESIS_KEYS})
    synthesizer = AnomalySynthesizer(settings, textures=None)
    out_images, out_masks = [images], [torch.zeros(len(images), 1, *images.shape[-2:], dtype=torch.uint8)]
    for i, img in enumerate(images):
        clean = img.float() / 255.0
        for attempt in range(16):   # a Perlin draw can be empty (or off the object): draw again
            g = torch.Generator().manual_seed(sample_seed(SYNTHETIC_VAL_SEED, attempt, i))
            result = synthesizer(clean, g)
            if result.label:
                break
        else:
            raise DataError(f"no synthetic anomaly fits held-out image {i} (foreground_threshold="
                            f"{config.foreground_threshold}); lower foreground_threshold")
        out_images.append((result.image * 255).round().to(torch.uint8)[None])
        out_masks.append(result.mask.to(torch.uint8)[None])
    labels = torch.cat([torch.zeros(len(images), dtype=torch.int64), torch.ones(len(images), dtype=torch.int64)])
    return EvalDataset(torch.cat(out_images), torch.cat(out_masks), labels)
