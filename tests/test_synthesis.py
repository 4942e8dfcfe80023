import pytest
import torch
from PIL import Image

from pouta_core.config import Config
from pouta_core.data.datasets import EvalDataset, TrainDataset
from pouta_core.synthesis import AnomalySynthesizer, TextureFolder, foreground_mask, perlin_mask, perlin_noise

CFG = Config.from_preset("tiny")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_perlin_mask_is_binary_and_reproducible():
    a = perlin_mask(64, 64, gen(1))
    b = perlin_mask(64, 64, gen(1))
    c = perlin_mask(64, 64, gen(2))
    assert a.shape == (1, 64, 64) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_perlin_noise_is_smooth_at_lattice_scale_and_bounded():
    n = perlin_noise(64, 64, 2, 2, gen())
    assert n.abs().max() <= 1.5
    # one lattice cell spans 32 px: neighbouring pixels differ little
    assert (n[1:] - n[:-1]).abs().max() < 0.2


def test_perlin_scale_grows_with_max_scale_exponent():
    def mean_edge(k):
        ms = [perlin_mask(64, 64, gen(s), threshold=0.0, max_scale_exp=k) for s in range(20)]
        return sum(float((m[:, 1:] != m[:, :-1]).float().mean()) for m in ms) / len(ms)
    assert mean_edge(1) < mean_edge(6)


def test_synthesis_keeps_one_value_range_and_pixels_outside_mask():
    synth = AnomalySynthesizer(CFG.replace(clean_ratio=0.0))
    image = torch.rand(3, 64, 64)
    for seed in range(10):
        out = synth(image, gen(seed))
        assert out.image.dtype == torch.float32 and 0.0 <= out.image.min() and out.image.max() <= 1.0
        assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
        assert out.label == int(out.mask.sum() > 0)
        keep = out.mask.expand_as(image) == 0
        assert torch.equal(out.image[keep], image[keep])


def test_beta_one_leaves_the_image_unchanged():
    synth = AnomalySynthesizer(CFG.replace(clean_ratio=0.0, beta_min=1.0, beta_max=1.0))
    image = torch.rand(3, 64, 64)
    assert torch.allclose(synth(image, gen()).image, image)


def test_clean_ratio_share_of_samples_stays_clean():
    synth = AnomalySynthesizer(CFG.replace(clean_ratio=0.5))
    image = torch.rand(3, 32, 32)
    clean = [synth(image, gen(s)) for s in range(200)]
    share = sum(torch.equal(c.image, image) and c.label == 0 for c in clean) / 200
    assert 0.4 < share < 0.65


def test_same_seed_same_sample():
    synth = AnomalySynthesizer(CFG.replace(clean_ratio=0.0))
    image = torch.rand(3, 64, 64)
    a, b = synth(image, gen(5)), synth(image, gen(5))
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)


def test_foreground_mask_keeps_anomalies_on_the_object():
    image = torch.zeros(3, 64, 64)
    image[:, 16:48, 16:48] = 0.9
    fg = foreground_mask(image, 0.3)
    assert fg[0, 16:48, 16:48].all() and fg.sum() == 32 * 32
    synth = AnomalySynthesizer(CFG.replace(clean_ratio=0.0, foreground_threshold=0.3))
    for s in range(10):
        assert (synth(image, gen(s)).mask * (1 - fg)).sum() == 0


def test_texture_folder_is_used_as_anomaly_source(tmp_path):
    folders = {}
    for name, colour in (("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name / "banded").mkdir(parents=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / name / "banded" / "a.jpg")
        (tmp_path / name / "notes.txt").write_text("not an image")
        folders[name] = TextureFolder(tmp_path / name, 64)
        assert len(folders[name]) == 1
    cfg = CFG.replace(clean_ratio=0.0, beta_min=0.0, beta_max=0.0)
    # The same seed with two textures of other colours: the masks agree and the anomalies
    # differ, which they could not if the texture were ignored.
    for seed in range(3):
        green, blue = (AnomalySynthesizer(cfg, folders[n])(torch.zeros(3, 64, 64), gen(seed)) for n in folders)
        inside = green.mask[0] > 0
        assert green.label == 1 and torch.equal(green.mask, blue.mask)
        assert (green.image[:, inside] - blue.image[:, inside]).abs().max() > 0.1
        assert torch.equal(green.image[:, ~inside], blue.image[:, ~inside])


def test_missing_texture_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="texture folder does not exist"):
        TextureFolder(tmp_path / "nope", 64)


def test_train_and_test_samples_share_the_value_range():
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    train = TrainDataset(images, AnomalySynthesizer(CFG.replace(clean_ratio=1.0)), seed=0)
    test = EvalDataset(images, torch.zeros(4, 1, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(train[1]["image"], test[1]["image"])
    assert test[1]["image"].max() <= 1.0 and test[1]["image"].max() > 0.5


def test_train_dataset_is_reproducible_per_epoch():
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    ds = TrainDataset(images, AnomalySynthesizer(CFG.replace(clean_ratio=0.0)), seed=7)
    ds.set_epoch(3)
    a = ds[2]["image"]
    ds.set_epoch(4)
    b = ds[2]["image"]
    ds.set_epoch(3)
    assert torch.equal(a, ds[2]["image"]) and not torch.equal(a, b)
