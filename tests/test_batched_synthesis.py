"""The batched synthesis path (pouta_core/synthesis/batched.py): the same recipe as the
per-sample path, for a whole batch, reproducible from one seed, on any device."""

import math

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as TF

from pouta_core.config import Config
from pouta_core.data.datasets import BatchedLoader, EpochSampler
from pouta_core.synthesis import AnomalySynthesizer, TextureFolder, foreground_mask, perlin_noise
from pouta_core.synthesis import augment as A
from pouta_core.synthesis import batched as B

CFG = Config.from_preset("tiny").replace(synthesis="batched")   # the path under test (not the default)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=8, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=gen(seed))


@pytest.mark.parametrize(("ry", "rx"), [(1, 1), (4, 32), (32, 2), (3, 24)])
def test_perlin_noise_batch_is_the_per_sample_noise(ry, rx):
    # perlin_noise draws its lattice angles first from the generator: the same draws, given
    # to the batched function, must give the same map (it is the same formula, factorised).
    reference = perlin_noise(50, 70, ry, rx, gen(3))
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=gen(3))
    batched = A.perlin_noise_batch(50, 70, torch.tensor([ry]), torch.tensor([rx]), angles[None])[0]
    assert torch.allclose(batched, reference, atol=1e-5)


# Each batched augmentation against torchvision's on single images, at the parameters the
# uniforms u map to (the ranges of sources.AUGMENTATIONS, DRAEM's list).
REFERENCES = {
    "_gamma": lambda x, u: TF.adjust_gamma(x, 0.5 + 1.5 * u[0]),
    "_brightness": lambda x, u: TF.adjust_brightness(x, 0.8 + 0.4 * u[0]) + (-0.1 + 0.2 * u[1]),
    "_sharpness": lambda x, u: TF.adjust_sharpness(x, 3.0 * u[0]),
    "_saturation_hue": lambda x, u: TF.adjust_hue(TF.adjust_saturation(x, 0.5 + u[0]), -0.2 + 0.4 * u[1]),
    "_solarize": lambda x, u: TF.solarize(x, 0.1 + 0.8 * u[0]),
    "_posterize": lambda x, u: TF.posterize(TF.to_dtype(x, torch.uint8, scale=True), 2 + int(4 * u[0])).float() / 255,
    "_invert": lambda x, u: TF.invert(x),
    "_autocontrast": lambda x, u: TF.autocontrast(x),
    "_equalize": lambda x, u: TF.equalize(TF.to_dtype(x, torch.uint8, scale=True)).float() / 255,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_batched_augmentations_match_torchvision_per_image(name):
    fn = getattr(A, name)
    x = images(3, 40)
    u = torch.tensor([[0.05, 0.9], [0.5, 0.1], [0.97, 0.6]])
    out = fn(x, u).clamp(0, 1)
    for i in range(3):
        expected = REFERENCES[name](x[i], u[i].tolist()).clamp(0, 1)
        assert torch.allclose(out[i], expected, atol=1e-5), (name, i, (out[i] - expected).abs().max())


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_batched_rotation_is_torchvision_rotate_per_image(mode):
    x = images(3, 48)
    degrees = torch.tensor([30.0, -70.0, 135.0])
    out = A._rotate(x, degrees, mode)
    for i in range(3):
        expected = TF.rotate(x[i], float(degrees[i]), interpolation=TF.InterpolationMode(mode))
        close = torch.isclose(out[i], expected, atol=1e-5).float().mean()
        # nearest: a sampling point exactly between two pixels may round the other way
        assert close == 1.0 if mode == "bilinear" else close > 0.99


def test_batch_keeps_the_value_range_the_pixels_outside_the_mask_and_labels():
    synth = B.BatchSynthesizer(CFG.replace(clean_ratio=0.5))
    clean = images(16)
    out = synth(clean, gen(1))
    assert out.image.shape == clean.shape and out.mask.shape == (16, 1, 64, 64)
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.label, (out.mask.flatten(1).sum(1) > 0).long())
    keep = out.mask.expand_as(clean) == 0
    assert torch.equal(out.image[keep], clean[keep])
    assert 0 < int(out.label.sum()) < 16   # some clean, some anomalous


def test_batch_is_reproducible_from_its_seed_alone():
    synth = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0))
    clean = images()
    a, b, c = synth(clean, gen(5)), synth(clean, gen(5)), synth(clean, gen(6))
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_clean_ratio_one_and_beta_one_leave_every_image_unchanged():
    clean = images()
    untouched = B.BatchSynthesizer(CFG.replace(clean_ratio=1.0))(clean, gen())
    assert torch.equal(untouched.image, clean) and untouched.label.sum() == 0
    invisible = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0, beta_min=1.0, beta_max=1.0))(clean, gen())
    assert torch.allclose(invisible.image, clean) and invisible.mask.sum() > 0


def test_texture_bank_is_the_anomaly_source(tmp_path):
    banks = {}
    for name, colour in (("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / name / "a.png")
        banks[name] = TextureFolder(tmp_path / name, 64).bank()
        assert banks[name].shape == (1, 3, 64, 64) and banks[name].dtype == torch.uint8
    cfg = CFG.replace(clean_ratio=0.0, beta_min=0.0, beta_max=0.0)
    clean = torch.zeros(4, 3, 64, 64)
    green, blue = (B.BatchSynthesizer(cfg, banks[n])(clean, gen(2)) for n in banks)
    # Same draws, other textures: the masks agree and the anomalies differ inside them.
    assert torch.equal(green.mask, blue.mask) and green.label.sum() > 0
    inside = green.mask.expand_as(clean) > 0
    assert (green.image[inside] - blue.image[inside]).abs().max() > 0.1
    assert torch.equal(green.image[~inside], blue.image[~inside])


def test_foreground_mask_batch_is_the_per_image_mask_and_keeps_anomalies_on_the_object():
    clean = torch.zeros(4, 3, 64, 64)
    clean[:, :, 16:48, 16:48] = 0.9
    clean[1] = 1 - clean[1]   # a dark object on a bright background
    fg = B.foreground_mask_batch(clean, 0.3)
    for i in range(4):
        assert torch.equal(fg[i], foreground_mask(clean[i], 0.3))
    out = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0, foreground_threshold=0.3))(clean, gen())
    assert (out.mask * (1 - fg)).sum() == 0


def test_batched_and_per_sample_paths_make_alike_anomalies():
    # Different draws, the same recipe: over many samples, the share of anomalous images and
    # the mean anomaly area agree.
    cfg = CFG.replace(clean_ratio=0.5)
    clean = images(64, 64, seed=3)
    batched = B.BatchSynthesizer(cfg)(clean, gen(11))
    per = [AnomalySynthesizer(cfg)(clean[i], gen(100 + i)) for i in range(64)]
    share_b, share_p = batched.label.float().mean(), sum(p.label for p in per) / 64
    area_b = batched.mask.mean()
    area_p = torch.stack([p.mask for p in per]).mean()
    assert abs(share_b - share_p) < 0.2
    assert 0.5 < float(area_b / area_p) < 2.0


def test_batched_masks_have_the_per_sample_area_distribution():
    # Not only the mean: the whole distribution of mask areas (issue 33). Rotating the noise
    # nearest-neighbour instead of bilinear before the threshold made the masks a quarter larger,
    # half again at the median, with few small ones; the two-sample KS test below gives p < 1e-60 then.
    from scipy.stats import ks_2samp

    from pouta_core.synthesis.perlin import perlin_mask

    n, size = 1000, 64
    per = torch.stack([perlin_mask(size, size, gen(i)) for i in range(n)]).flatten(1).mean(1)
    synth = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0))
    blank = torch.zeros(100, 3, size, size)
    bat = torch.cat([synth(blank, gen(10_000 + k)).mask for k in range(n // 100)])
    bat = bat.flatten(1).mean(1)
    per, bat = per[per > 0], bat[bat > 0]
    assert ks_2samp(per.numpy(), bat.numpy()).pvalue > 0.01
    assert abs(float(bat.median() / per.median()) - 1) < 0.1


def test_batched_loader_batches_are_those_of_the_sampler_and_differ_by_rank():
    clean = (images(8, 32) * 255).to(torch.uint8)
    cfg = CFG.replace(clean_ratio=1.0)   # clean batches: the images themselves, in sampler order
    loaders = [B_loader(clean, cfg, rank) for rank in (0, 1)]
    for loader in loaders:
        loader.sampler.set_epoch(3)
    seen = []
    for loader in loaders:
        order = [i for _, i in loader.sampler]
        batches = list(loader)
        assert len(batches) == 2
        for step, batch in enumerate(batches):
            rows = order[step * 2:(step + 1) * 2]
            assert torch.equal(batch["clean"], clean[rows].float() / 255)
            assert torch.equal(batch["image"], batch["clean"])
        seen += order
    assert sorted(seen) == list(range(8))   # the two ranks split the epoch


def B_loader(clean, cfg, rank):
    return BatchedLoader(clean, B.BatchSynthesizer(cfg), EpochSampler(len(clean), 0, (rank, 2)), 2,
                         torch.device("cpu"))


class HostToDeviceCopies(TorchDispatchMode):
    """Records each copy from a CPU tensor to another device (the op, whether its source is
    pinned, whether it is non-blocking): what makes a CUDA host wait for the device."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            src, dst, non_blocking = args[0], out, kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            src, dst, non_blocking = args[1], args[0], (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        else:
            return out
        if src.device.type == "cpu" and dst.device.type != "cpu":
            self.copies.append((func, src.is_pinned(), non_blocking))
        return out


def test_an_epoch_of_batches_copies_to_the_device_once_per_step_and_never_reads_it_back(device):
    # The device is the test device, or "meta" here: a meta tensor has no data, so any read
    # of a device tensor on the host (a sync on CUDA) raises. The epoch's order is copied
    # once; each step copies its draws once (all anomalous: every step has draws). Before,
    # each step copied its rows of the order from pageable memory as well (issue 50 item 4).
    target = torch.device("meta") if device.type == "cpu" else device
    clean = (torch.rand(12, 3, 32, 32, generator=gen(1)) * 255).to(torch.uint8)
    cfg = CFG.replace(image_size=32, clean_ratio=0.0)
    loader = BatchedLoader(clean, B.BatchSynthesizer(cfg), EpochSampler(len(clean), 0), 2, target)
    list(loader)   # the first epoch caches the per-device constants
    loader.sampler.set_epoch(1)
    with HostToDeviceCopies() as recorder:
        steps = sum(1 for batch in loader if batch["image"].device.type == target.type)
    assert steps == 6
    assert len(recorder.copies) == steps + 1
    if target.type == "cuda":
        assert all(pinned and non_blocking for _, pinned, non_blocking in recorder.copies), recorder.copies


def test_a_batch_on_the_test_device_matches_the_cpu_batch(device):
    if device.type == "cpu":
        pytest.skip("compares a CUDA batch with the CPU one: run with POUTA_TEST_DEVICE=cuda (bench/gpu_check.sh)")
    synth = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0))
    clean = images(8)
    cpu, gpu = synth(clean, gen(4)), synth(clean.to(device), gen(4))
    # The same draws; only the last bits of the arithmetic may differ, and so a pixel exactly
    # at a mask's threshold.
    agree = (cpu.mask == gpu.mask.cpu()).float().mean()
    assert agree > 0.999
    both = (cpu.mask * gpu.mask.cpu()).expand_as(clean) > 0
    assert (cpu.image[both] - gpu.image.cpu()[both]).abs().max() < 1e-3


def test_make_loader_gives_the_configured_path_with_the_texture_bank(tmp_path):
    from torch.utils.data import DataLoader

    from pouta_core.training import make_loader

    Image.new("RGB", (40, 30), (0, 255, 0)).save(tmp_path / "a.png")
    textures = TextureFolder(tmp_path, 32)
    clean = (images(4, 32) * 255).to(torch.uint8)
    kw = {"textures": textures, "batch_size": 2, "shard": (0, 1), "num_workers": 0, "device": torch.device("cpu")}
    batched = make_loader(clean, CFG, **kw)
    assert isinstance(batched, BatchedLoader) and torch.equal(batched.synthesizer.bank, textures.bank())
    batch = next(iter(batched))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    per_sample = make_loader(clean, CFG.replace(synthesis="per_sample"), **kw)
    assert isinstance(per_sample, DataLoader) and per_sample.dataset.synthesizer.textures is textures


def test_self_source_ratio_one_makes_every_source_from_the_image_itself(tmp_path):
    banks = []
    for colour in ((0, 255, 0), (0, 0, 255)):
        folder = tmp_path / str(colour[1])
        folder.mkdir()
        Image.new("RGB", (40, 30), colour).save(folder / "a.png")
        banks.append(TextureFolder(folder, 64))
    cfg = CFG.replace(clean_ratio=0.0, self_source_ratio=1.0)
    clean = images(4)
    green, blue = (B.BatchSynthesizer(cfg, t.bank())(clean, gen(3)) for t in banks)
    assert green.label.sum() > 0 and torch.equal(green.image, blue.image)    # no texture in it
    one = [AnomalySynthesizer(cfg, t)(clean[0], gen(3)) for t in banks]
    assert torch.equal(one[0].image, one[1].image)
    # off (the default), the texture shows: the stream of other draws is unchanged
    off = [B.BatchSynthesizer(CFG.replace(clean_ratio=0.0), t.bank())(clean, gen(3)) for t in banks]
    assert not torch.equal(off[0].image, off[1].image)


def test_the_intensity_tables_are_the_seven_maps_in_turn():
    # The synthesis applies gamma, brightness, invert, solarize, posterize, autocontrast and
    # equalize (each where drawn) as one table per channel; here each map is applied in turn
    # with its reference function (tested against torchvision above) to the same 8-bit image.
    n = 24
    x = images(n, 32, seed=7)
    x[3] = 0.5                                              # flat: autocontrast and equalize leave it
    drawn = torch.rand(n, 10, generator=gen(8)) < 0.5
    drawn[0], drawn[1] = True, False                        # all of them; none of them
    u = torch.rand(n, 10, 2, generator=gen(9))
    tables = torch.cat([A.intensity_tables(drawn, u), drawn[:, [A.AUTOCONTRAST, A.EQUALIZE]]], 1)
    out = A.apply_tables(x, tables.repeat_interleave(3, 0))
    expected = (x * A.TO_UINT8).floor() / 255
    for which in (A.GAMMA, A.BRIGHTNESS, A.INVERT, A.SOLARIZE, A.POSTERIZE, A.AUTOCONTRAST, A.EQUALIZE):
        rows = drawn[:, which]
        expected[rows] = A.AUGMENTATIONS[which](expected[rows], u[rows, which]).clamp(0, 1)
    close = (out - expected).abs() < 1e-5
    # a value exactly at a posterize step or an 8-bit boundary may round the other way
    assert close.float().mean() > 0.999, (~close).nonzero()[:5]
    assert torch.allclose(out[1], expected[1], atol=1e-5) and torch.allclose(out[3], expected[3], atol=1e-5)


@pytest.mark.parametrize(("clean_ratio", "bank"), [(0.0, False), (0.5, False), (0.5, True)])
def test_a_batch_costs_the_same_few_ops_whatever_its_size(clean_ratio, bank, tmp_path):
    # What a GPU step would launch (issue 29): before, ~1,800 ops per batch of 8 and ~4,400 per
    # batch of 32, a Python loop over samples, and reads of device tensors on the host.
    from pouta_core.benchmark import synthesis_ops

    textures = None
    if bank:
        Image.new("RGB", (40, 30), (0, 255, 0)).save(tmp_path / "a.png")
        textures = TextureFolder(tmp_path, 64)
    r = synthesis_ops(CFG.replace(clean_ratio=clean_ratio), batch_sizes=(8, 32, 64), textures=textures)
    small, large, larger = r["batch_8"], r["batch_32"], r["batch_64"]
    assert large == larger      # every kind of augmentation drawn: the full count
    assert small["device_ops"] <= large["device_ops"] <= 150   # fewer when a batch draws no sharpening, say
    assert small["device_syncs"] == large["device_syncs"] == 0


def test_a_batch_of_oblong_images_gets_masks_and_sources_of_its_shape():
    # Height and width apart: the lattices of the two axes are weighed in two calls.
    clean = torch.rand(16, 3, 48, 80, generator=gen(4))
    out = B.BatchSynthesizer(CFG.replace(clean_ratio=0.0))(clean, gen(5))
    assert out.image.shape == clean.shape and out.mask.shape == (16, 1, 48, 80)
    assert out.label.sum() == 16 and 0.005 < float(out.mask.mean()) < 0.2
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert torch.equal(out.image[out.mask.expand_as(clean) == 0], clean[out.mask.expand_as(clean) == 0])


def test_loader_workers_read_the_texture_bank_decoded_once_before_they_start(tmp_path, monkeypatch):
    # Each per-sample worker decoded (and kept) its own copy of the folder: ~850 MB of DTD at
    # 224 per worker. Now the parent decodes it once and the forked workers read its pages; a
    # worker that decodes an image fails here (they inherit the patched reader).
    import pouta_core.data.images as images_module
    from pouta_core.training import make_loader

    for i, colour in enumerate(((0, 255, 0), (0, 0, 255), (255, 0, 0))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    clean = (images(4, 32) * 255).to(torch.uint8)
    cfg = CFG.replace(synthesis="per_sample", clean_ratio=0.0)
    lazy = TextureFolder(tmp_path, 32)
    kw = {"batch_size": 2, "shard": (0, 1), "device": torch.device("cpu")}
    expected = [b["image"] for b in make_loader(clean, cfg, textures=lazy, num_workers=0, **kw)]
    textures = TextureFolder(tmp_path, 32)
    loader = make_loader(clean, cfg, textures=textures, num_workers=2, **kw)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a loader worker decoded a texture")

    monkeypatch.setattr(images_module, "load_image", no_decoding)
    got = [b["image"] for b in loader]
    assert len(got) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert textures.bank() is textures.bank()   # decoded once, kept as one tensor
