"""The validation split: stratified from the test split, or synthetic from held-out good
images; stable, disjoint from what is trained on and from what is reported."""

import shutil

import pytest
import torch

from pouta_core.api import load_category
from pouta_core.config import Config
from pouta_core.data import DataError, read_split
from pouta_core.data.demo import generate
from pouta_core.data.validation import split_for_selection, synthetic_validation

CFG = Config.from_preset("tiny", ["image_size=32"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("val") / "data"
    generate(root, categories=1, image_size=32, n_train=10, n_test_good=6, n_test_defect=4)
    return root


def test_from_test_is_stratified_by_defect_and_never_overlaps_test(demo):
    split = read_split(demo, "mvtec", "tiles")
    parts = split_for_selection(split, demo, "from_test", 0.3)
    val, test = {s.path for s in parts.val}, {s.path for s in parts.test}
    assert not val & test and val | test == {s.path for s in split.test}
    per_defect = {d: sum(s.defect == d for s in parts.val) for d in ("good", "scratch", "stain", "missing")}
    assert per_defect == {"good": 2, "scratch": 1, "stain": 1, "missing": 1}   # round(0.3 n) per stratum
    assert parts.train == split.train


def test_the_split_depends_on_the_files_only(demo):
    split = read_split(demo, "mvtec", "tiles")
    a = split_for_selection(split, demo, "from_test", 0.3)
    shuffled = type(split)(list(reversed(split.train)), list(reversed(split.test)))
    b = split_for_selection(shuffled, demo, "from_test", 0.3)
    assert a.val_files(demo) == b.val_files(demo)
    assert a.val_files(demo) != split_for_selection(split, demo, "from_test", 0.6).val_files(demo)


def test_a_ratio_that_empties_a_part_is_one_clear_error(demo):
    split = read_split(demo, "mvtec", "tiles")
    with pytest.raises(DataError, match=r"val_ratio=0.05 leaves the validation part without a good and an anomalous"):
        split_for_selection(split, demo, "from_test", 0.05)


def test_auto_falls_back_to_synthetic_without_defect_images(tmp_path, demo):
    root = tmp_path / "data"
    shutil.copytree(demo / "tiles" / "train", root / "tiles" / "train")
    split = read_split(root, "mvtec", "tiles")
    parts = split_for_selection(split, root, "auto", 0.3)
    assert parts.mode == "synthetic" and parts.test == []
    assert len(parts.val) == 3 and not {s.path for s in parts.val} & {s.path for s in parts.train}
    with pytest.raises(DataError, match="val_split=from_test needs good and anomalous test images"):
        split_for_selection(split, root, "from_test", 0.3)


def test_synthetic_validation_is_fixed_whatever_the_trial_searches(demo):
    data = load_category(demo, "mvtec", "tiles", CFG.replace(val_split="synthetic"), progress=False)
    other = load_category(demo, "mvtec", "tiles", CFG.replace(val_split="synthetic", seed=7, beta_max=0.3,
                                                                  perlin_threshold=0.7), progress=False)
    val = data.val_set
    assert len(val) == 2 * 3 and val.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(m.sum() > 0 for m in val.masks[3:]) and val.masks[:3].sum() == 0
    assert torch.equal(val.images, other.val_set.images) and torch.equal(val.masks, other.val_set.masks)
    assert len(data.train_images) == 7 and data.test_set is not None   # demo data has a labelled test split


def test_synthetic_anomalies_respect_the_foreground_threshold(demo):
    images = load_category(demo, "mvtec", "tiles", CFG, progress=False).train_images[:2]
    with pytest.raises(DataError, match="lower foreground_threshold"):
        synthetic_validation(torch.zeros_like(images), CFG.replace(foreground_threshold=0.5))


def test_none_reports_the_test_set_as_validation(demo):
    data = load_category(demo, "mvtec", "tiles", CFG.replace(val_split="none"), progress=False)
    assert data.test_set is data.val_set and len(data.val_set) == 6 + 3 * 4
    assert data.selection_record()["val_split"] == "none"
