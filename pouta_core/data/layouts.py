"""Where the images, labels and masks of each supported data set layout live.

Each reader returns a :class:`Split` of :class:`Sample` records and validates the layout;
the pixels are read later, once, through the image cache."""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pouta_core.data.errors import DataError
from pouta_core.data.images import list_images

log = logging.getLogger(__name__)

DATASETS = ("mvtec", "visa", "dagm", "folder")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int                 # 0 good, 1 anomalous
    mask: Path | None = None   # None: no pixel annotation (an all-zero mask for good images)
    defect: str = "good"


@dataclass
class Split:
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _check_category(root: Path, category: str, available: list[str]) -> None:
    if category not in available:
        raise DataError(f"{root}: unknown category '{category}'; available: {', '.join(sorted(available)) or 'none'}")


def categories(root: str | Path, dataset: str) -> list[str]:
    root = _require_dir(Path(root), "data root")
    if dataset in ("mvtec", "folder"):
        return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    if dataset == "dagm":
        return sorted(p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"Class\d+", p.name))
    if dataset == "visa":
        return sorted({row["object"] for row in _visa_rows(root)})
    raise DataError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")


def _check_train(split: Split, where: Path) -> Split:
    if not split.train:
        raise DataError(f"{where}: empty train split (no good images)")
    return split


def read_mvtec(root: Path, category: str) -> Split:
    """``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``."""
    _check_category(root, category, categories(root, "mvtec"))
    base = root / category
    train = [Sample(p, 0) for p in list_images(_require_dir(base / "train" / "good", "train/good"))]
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for p in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(p, 0))
                    continue
                mask = base / "ground_truth" / defect / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"{p}: defect image without a mask (expected {mask})")
                test.append(Sample(p, 1, mask, defect))
    return _check_train(Split(train, test), base / "train" / "good")


def _visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: VisA split file not found")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: missing columns {', '.join(sorted(missing))}")
        return list(reader)


def _inside(root: Path, rel: str, csv_path: Path, line: int) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{csv_path}:{line}: path '{rel}' escapes the data root {root}")
    return path


def read_visa(root: Path, category: str) -> Split:
    """``split_csv/1cls.csv`` with columns object,split,label,image,mask (paths relative to root)."""
    rows = _visa_rows(root)
    _check_category(root, category, sorted({r["object"] for r in rows}))
    csv_path = root / "split_csv" / "1cls.csv"
    split = Split([], [])
    for line, row in enumerate(rows, start=2):
        if row["object"] != category:
            continue
        image = _inside(root, row["image"], csv_path, line)
        label = 0 if row["label"].strip().lower() == "normal" else 1
        mask = _inside(root, row["mask"], csv_path, line) if row["mask"].strip() else None
        if label == 1 and mask is None:
            raise DataError(f"{image}: defect image without a mask ({csv_path}:{line})")
        sample = Sample(image, label, mask, "good" if label == 0 else "anomaly")
        if row["split"].strip() == "train":
            if label == 0:
                split.train.append(sample)
        else:
            split.test.append(sample)
    return _check_train(split, csv_path)


def _dagm_labels(folder: Path) -> dict[str, str | None]:
    """``Label/Labels.txt``: a header line, then ``id flag image 0 label_image`` rows."""
    labels_txt = folder / "Label" / "Labels.txt"
    if not labels_txt.is_file():
        raise DataError(f"{labels_txt}: DAGM label file not found")
    out: dict[str, str | None] = {}
    for n, line in enumerate(labels_txt.read_text().splitlines()[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5 or parts[1] not in ("0", "1"):
            raise DataError(f"{labels_txt}:{n}: expected 'id flag image 0 label_image', got '{line.strip()}'")
        out[parts[2]] = parts[4] if parts[1] == "1" else None
    return out


def read_dagm(root: Path, category: str) -> Split:
    """``ClassN/{Train,Test}/`` with ``Label/Labels.txt`` and ``*_label.PNG``; trains on the
    defect-free images of Train only."""
    _check_category(root, category, categories(root, "dagm"))
    split = Split([], [])
    for part in ("Train", "Test"):
        folder = root / category / part
        if part == "Test" and not folder.is_dir():
            continue
        folder = _require_dir(folder, f"{category}/{part}")
        labels = _dagm_labels(folder)
        for p in list_images(folder):
            if p.name not in labels:
                raise DataError(f"{p}: not listed in {folder / 'Label' / 'Labels.txt'}")
            label_name = labels[p.name]
            if label_name is None:
                sample = Sample(p, 0)
            else:
                mask = folder / "Label" / label_name
                if not mask.is_file():
                    raise DataError(f"{p}: defect image without a mask (expected {mask})")
                sample = Sample(p, 1, mask, "defect")
            if part == "Train":
                if sample.label == 0:
                    split.train.append(sample)
            else:
                split.test.append(sample)
    return _check_train(split, root / category / "Train")


def read_folder(root: Path, category: str) -> Split:
    """Generic: ``<cat>/train/`` good images; optional ``<cat>/test/good/``,
    ``<cat>/test/<defect>/`` and ``<cat>/masks/<defect>/<stem>.png``. A defect folder either
    has a mask for every image or no masks folder at all (image-level metrics only)."""
    _check_category(root, category, categories(root, "folder"))
    base = root / category
    train = [Sample(p, 0) for p in list_images(base / "train")]
    test: list[Sample] = []
    if (base / "test").is_dir():
        for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
            defect = defect_dir.name
            masks_dir = base / "masks" / defect
            for p in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(p, 0))
                    continue
                mask = None
                if masks_dir.is_dir():
                    candidates = [m for m in masks_dir.glob(f"{p.stem}.*") if m.is_file()]
                    if not candidates:
                        raise DataError(f"{p}: defect image without a mask in {masks_dir}")
                    mask = candidates[0]
                test.append(Sample(p, 1, mask, defect))
    return _check_train(Split(train, test), base / "train")


READERS = {"mvtec": read_mvtec, "visa": read_visa, "dagm": read_dagm, "folder": read_folder}


def read_split(root: str | Path, dataset: str, category: str) -> Split:
    if dataset not in READERS:
        raise DataError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")
    return READERS[dataset](_require_dir(Path(root), "data root"), category)
