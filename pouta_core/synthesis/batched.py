"""Anomaly synthesis (paper §3.1) for a whole batch at once, with torch ops on the batch's
device: the recipe of the per-sample path (:class:`~pouta_core.synthesis.AnomalySynthesizer`)
in a fixed number of ops whatever the batch size, so on a GPU node the host never gates the
step: no Python loop over samples, no read of a device tensor, one host-to-device copy.

Per batch: a Perlin mask per sample (scale 2^k per axis, rotated, thresholded), an anomaly
source per sample (a texture from the bank or procedural fractal noise, three of DRAEM's ten
augmentations, fused with a shifted, rotated or unchanged copy of the image), the blend
``I_in = I_ori (1 - M) + (beta I_ori + (1 - beta) I_aug) M``, and a share ``clean_ratio`` of
samples left untouched.

A batch is made in two halves. :meth:`BatchSynthesizer.draw` makes every random number on the
CPU from the caller's ``torch.Generator`` and turns them into the batch's parameters (lattice
sizes, gradient directions, sampling grids' affines, intensity tables, which samples get
which augmentation), packed in one flat CPU tensor. :meth:`BatchSynthesizer.apply` copies it
to the device once (pinned, non-blocking on CUDA) and does the pixel work there.

*Decisions* (issue 29):
- DRAEM applies its three augmentations in a random order; this path applies the same three
  (drawn as DRAEM draws them) in a fixed order: rotation, sharpness, saturation and hue, the
  seven per-channel intensity maps (gamma, brightness, invert, solarize, posterize,
  autocontrast, equalize, composed into one 256-entry table per channel). One pass per kind
  for the whole batch instead of one call per (step, augmentation): 30 calls at a batch of
  32 before. Rotation first, so that the maps after it act on the corners it leaves, as they
  do in two orders of three in DRAEM: with rotation last instead, the anomalies' brightness
  against their surroundings drifted from the per-sample path's with a texture folder
  (bench/synthesis_stats.py; docs/experiments.md). The intensity maps see the source as 8
  bits, as DRAEM's imgaug does.
- Every sample's Perlin lattice, and the four octaves of every procedural texture's, are
  computed in one batched product, padded to the largest lattice (about ten times the
  multiply-adds of the smallest, and still a small share of the batch's time).

Reproducibility: a batch depends on the generator's seed alone: the same (seed, epoch, rank,
step) gives the same batch on CPU, bit for bit. On CUDA the draws are the same; the pixel
arithmetic may round differently in the last bits, so a CUDA batch matches a CPU batch to
about 1e-5 and a pixel at the exact threshold of a mask may flip. The stream of draws is not
the per-sample path's: the two paths make different (equally distributed) anomalies.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pouta_core.config import Config
from pouta_core.synthesis.augment import (
    AUTOCONTRAST,
    EQUALIZE,
    ROTATE,
    SATURATION_HUE,
    SECTORS,
    SHARPNESS,
    apply_tables,
    axis_weights,
    intensity_tables,
    lattice_noise,
    rotation,
    sampling_grid,
    saturate_and_shift_hue,
    sharpen,
)

N_AUGMENTATIONS = 10
AUGMENTATIONS_PER_SOURCE = 3
OCTAVES = 4                 # procedural textures: base lattice 1-3 cells, doubled per octave
TEXTURE_SIDES = [3 * 2**o + 1 for o in range(OCTAVES)]
TEXTURE_OFFSETS = torch.tensor([sum(TEXTURE_SIDES[:o]) for o in range(OCTAVES)], dtype=torch.float32)
TEXTURE_SCALES = torch.tensor([0.5**o for o in range(OCTAVES)])
# Columns of a batch's uniform draws, one row per synthesised sample.
RES, MASK_TURN, WEIGHT, SELF_SOURCE, BETA, COPY, COPY_DY, COPY_DX, COPY_TURN, TEXTURE = 0, 2, 3, 4, 5, 6, 7, 8, 9, 10
ORDER, AUG_U, COLOURS, BASE, COLUMNS = 11, 21, 41, 47, 50
DRAW_SCOPE = "pouta.synthesis.draw"


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The generator seed of one training batch."""
    return (((seed * 1_000_003 + epoch) * 10_007 + rank) * 1_000_033 + step) % 2**63


@dataclass(frozen=True)
class Batch:
    image: torch.Tensor   # (B, 3, H, W) float in [0, 1]: I_in
    mask: torch.Tensor    # (B, 1, H, W) float 0/1: M
    label: torch.Tensor   # (B,) int64: 1 when the mask is not empty


@dataclass(frozen=True)
class Plan:
    """Everything random about one batch, made on the CPU: ``k``, the number of samples that
    get an anomaly (the first k of the batch), and ``flat``, their parameters packed in one
    float32 tensor, cut by ``shapes``."""
    n: int
    k: int
    flat: torch.Tensor
    shapes: dict[str, tuple[int, ...]]

    def unpack(self, device: torch.device) -> dict[str, torch.Tensor]:
        flat = to_device(self.flat, device)
        parts = flat.split([math.prod(s) for s in self.shapes.values()])
        return {name: part if len(shape) == 1 else part.view(shape)
                for (name, shape), part in zip(self.shapes.items(), parts, strict=True)}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to CUDA from pinned memory without blocking
    the host (the copy is ordered on the stream before the kernels that read it)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _block_diagonal(side: int) -> torch.Tensor:
    """1 on the octaves' blocks of a procedural texture's shared lattice, 0 elsewhere."""
    block = torch.zeros(side, side)
    for offset, size in zip(TEXTURE_OFFSETS.long().tolist(), TEXTURE_SIDES, strict=True):
        block[offset:offset + size, offset:offset + size] = 1
    return block


def drawn_augmentations(keys: torch.Tensor) -> torch.Tensor:
    """(k, 10) bool: the three augmentations each sample draws from its ten uniform ``keys``
    (DRAEM's draw: the first three of a random permutation)."""
    return keys.argsort(1).argsort(1) < AUGMENTATIONS_PER_SOURCE


class BatchSynthesizer:
    """The batched path. ``bank``: texture sources as a (N, 3, S, S) uint8 tensor (see
    :meth:`~pouta_core.synthesis.TextureFolder.bank`), kept on the device of the batches."""

    def __init__(self, config: Config, bank: torch.Tensor | None = None) -> None:
        self.config = config
        self.bank = bank
        mask_side = 2 ** (config.perlin_max_scale_exp - 1) + 1
        self.side = mask_side if bank is not None else max(mask_side, sum(TEXTURE_SIDES))
        self._block = _block_diagonal(self.side) if bank is None else None

    def __call__(self, clean: torch.Tensor, generator: torch.Generator) -> Batch:
        """``clean``: (B, 3, H, W) float in [0, 1] on any device; ``generator``: a CPU
        generator, the only source of randomness."""
        n, _, h, w = clean.shape
        with torch.profiler.record_function(DRAW_SCOPE):   # CPU work: profiles tell it from the device's
            plan = self.draw(n, h, w, generator)
        return self.apply(clean, plan)

    # --- on the CPU ------------------------------------------------------------------------

    def draw(self, n: int, h: int, w: int, generator: torch.Generator) -> Plan:
        """Every random number of a batch of ``n`` (h, w) images, in a fixed order, and the
        parameters they give. CPU only: nothing here waits for a device."""
        cfg, g = self.config, generator
        # How many samples get an anomaly: the first k of the batch (a batch's order is its
        # sampler's random permutation), k as many as draws of at least clean_ratio.
        k = int((torch.rand(n, generator=g) >= cfg.clean_ratio).sum())
        if k == 0:
            return Plan(n, k, torch.zeros(0), {})
        u = torch.rand(k, COLUMNS, generator=g)
        procedural = self.bank is None
        lattices = 4 * k if procedural else k          # a mask per sample, 3 noise channels per texture
        angles = (2 * math.pi) * torch.rand(lattices, self.side, self.side, generator=g)
        gradients = torch.stack([torch.cos(angles), torch.sin(angles)]).mul_(math.sqrt(2))   # the noise's factor
        if procedural:
            gradients[:, k:] *= self._block
        parts: dict[str, torch.Tensor] = {"gradients": gradients}
        parts.update(self._lattices(u, k, h, w, procedural))
        augmentations, turn = self._augmentations(u, k)
        parts.update(augmentations)
        parts["affine"] = self._affines(u, k, h, w, turn)
        # Per sample: the period of the copy's sampling coordinates (a shifted copy wraps
        # around; any other is inside (-2, 2) and a period of 1e6 leaves it alone), the weight
        # of the foreign source in I_aug, and 1 - beta.
        period = torch.where(u[:, COPY] < 1 / 3, 2.0, 1e6)
        weight = 0.5 + 0.5 * u[:, WEIGHT]
        if cfg.self_source_ratio > 0:
            weight = torch.where(u[:, SELF_SOURCE] < cfg.self_source_ratio, 0.0, weight)
        keep = 1 - (cfg.beta_min + (cfg.beta_max - cfg.beta_min) * u[:, BETA])
        scalars = [period[:, None], weight[:, None], keep[:, None]]
        if procedural:   # and the texture's two colours
            scalars.append(u[:, COLOURS:COLOURS + 6])
        else:
            parts["texture"] = (u[:, TEXTURE] * len(self.bank)).floor().clamp_max(len(self.bank) - 1)
        parts["scalars"] = torch.cat(scalars, 1)[..., None, None]       # (k, 3 or 9, 1, 1)
        shapes = {name: tuple(t.shape) for name, t in parts.items()}
        return Plan(n, k, torch.cat([t.reshape(-1).float() for t in parts.values()]), shapes)

    def _lattices(self, u: torch.Tensor, k: int, h: int, w: int, procedural: bool) -> dict[str, torch.Tensor]:
        """Lattice cells, offsets and weights of every noise row along y and x (stacked when
        h == w: one call to axis_weights for both)."""
        res = 2.0 ** (u[:, RES:RES + 2] * self.config.perlin_max_scale_exp).floor()     # (k, 2): y, x
        pad = torch.zeros(k, OCTAVES - 1)
        mask_y, mask_x = torch.cat([res[:, :1], pad], 1), torch.cat([res[:, 1:], pad], 1)
        mask_scale = torch.cat([torch.ones(k, 1), pad], 1)
        offsets, scale_y, scale_x = torch.zeros(k, OCTAVES), mask_scale, mask_scale
        if procedural:
            base = (3 * u[:, BASE:BASE + 3]).floor().add_(1).reshape(3 * k, 1)
            texture = base * 2.0 ** torch.arange(OCTAVES)
            mask_y, mask_x = torch.cat([mask_y, texture]), torch.cat([mask_x, texture])
            offsets = torch.cat([offsets, TEXTURE_OFFSETS.expand(3 * k, OCTAVES)])
            scale_y = torch.cat([scale_y, TEXTURE_SCALES.expand(3 * k, OCTAVES)])
            scale_x = torch.cat([scale_x, torch.ones(3 * k, OCTAVES)])
        # axis_weights's res (R, 1, O), offsets (R, 1, O) and scales (R, 1, 2 O), side by side
        y = torch.cat([mask_y, offsets, scale_y, scale_y], 1)[:, None]
        x = torch.cat([mask_x, offsets, scale_x, scale_x], 1)[:, None]
        return {"lattice": torch.cat([y, x])} if h == w else {"lattice_y": y, "lattice_x": x}

    @staticmethod
    def _augmentations(u: torch.Tensor, k: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Three of the ten augmentations per sample (DRAEM's draw: the first three of a random
        permutation), as the sub-batches of the two spatial ones, the intensity tables, and the
        rotation's angle."""
        drawn = drawn_augmentations(u[:, ORDER:ORDER + N_AUGMENTATIONS])
        au = u[:, AUG_U:AUG_U + 2 * N_AUGMENTATIONS].view(k, N_AUGMENTATIONS, 2)
        parts = {}
        index = drawn[:, SHARPNESS].nonzero().flatten()
        if len(index):   # factor 3 u, passed as (1 - factor) / 13
            parts["sharp"], parts["sharp_w"] = index, ((1 - 3 * au[index, SHARPNESS, 0]) / 13).view(-1, 1, 1, 1)
        index = drawn[:, SATURATION_HUE].nonzero().flatten()
        if len(index):   # saturation 0.5 + u, hue shift -0.2 + 0.4 u of a turn, in sixths
            saturation, shift = au[index, SATURATION_HUE].T
            parts["hue"], parts["saturation"] = index, (0.5 + saturation).view(-1, 1, 1, 1)
            parts["hue_shift"] = (2.4 * shift - 1.2).view(-1, 1, 1, 1) + SECTORS
        # a row per channel: the table, then whether to autocontrast and to equalize
        tables = torch.cat([intensity_tables(drawn, au), drawn[:, [AUTOCONTRAST, EQUALIZE]]], 1)
        parts["tables"] = tables.repeat_interleave(3, 0)
        return parts, torch.where(drawn[:, ROTATE], -45 + 90 * au[:, ROTATE, 0], 0.0)

    @staticmethod
    def _affines(u: torch.Tensor, k: int, h: int, w: int, turn: torch.Tensor) -> torch.Tensor:
        """(3k, 3, 2) affines of sampling_grid: the masks' rotation, the augmentation's
        rotation, and the image's own copy: shifted (a roll of up to half its size), rotated
        or unchanged, a third of the samples each."""
        choice = (3 * u[:, COPY]).floor().clamp_max(2)
        copy_turn = torch.where(choice == 1, -180 + 360 * u[:, COPY_TURN], 0.0)
        degrees = torch.cat([-90 + 180 * u[:, MASK_TURN], turn, copy_turn])
        shift = ((torch.tensor([h + 1, w + 1]) * u[:, COPY_DY:COPY_DX + 1]).floor() - torch.tensor([h // 2, w // 2]))
        shift = torch.where(choice[:, None] == 0, shift * torch.tensor([-2 / h, -2 / w]), 0.0)   # roll: sample p - d
        shift += 1   # the copy's grid comes 1 higher, for the remainder of its period (apply)
        ty, tx = torch.cat([torch.zeros(2 * k, 2), shift]).unbind(1)
        return rotation(degrees, tx, ty)

    # --- on the batch's device ------------------------------------------------------------

    def apply(self, clean: torch.Tensor, plan: Plan) -> Batch:
        """The pixel work of ``plan`` on ``clean`` (B, 3, H, W), on its device."""
        cfg = self.config
        n, _, h, w = clean.shape
        dev = clean.device
        k = plan.k
        if k == 0:
            zeros = torch.zeros(n, 1, h, w, device=dev)
            return Batch(clean.clone(), zeros, torch.zeros(n, dtype=torch.long, device=dev))
        p = plan.unpack(dev)
        scalars = p["scalars"]
        period, weight, keep, *colours = scalars.split([1, 1, 1] + [3, 3] * (scalars.shape[1] > 3), 1)
        noise, texture = self._noise(p, h, w).split([k, p["gradients"].shape[1] - k])
        grids = sampling_grid(p["affine"], h, w).split(k)
        mask = F.grid_sample(noise[:, None], grids[0], mode="bilinear", padding_mode="zeros",
                             align_corners=False) > cfg.perlin_threshold
        foreign = self._augment(self._foreign(texture, colours, p, k, h, w), p, grids[1])
        original = clean if k == n else clean[:k]
        # The image's own copy, shifted (wrapping around), rotated or unchanged; sampled less
        # its mean colour, so that the corners a rotation leaves (zeros) are that colour.
        mean = original.mean((2, 3), keepdim=True)
        copy = F.grid_sample(original - mean, grids[2].remainder(period).sub_(1), mode="bilinear",
                             padding_mode="zeros", align_corners=False).add_(mean)
        # I_aug = w foreign + (1 - w) copy; I_in = I + M (1 - beta) (I_aug - I): the paper's blend.
        source = copy.lerp_(foreign, weight)
        if cfg.foreground_threshold is not None:
            mask &= _foreground(original, cfg.foreground_threshold)
        mask = mask.float()
        blended = torch.lerp(original, source, mask * keep).clamp_(0, 1)
        if k < n:
            blended = torch.cat([blended, clean[k:]])
            mask = F.pad(mask, (0, 0, 0, 0, 0, 0, 0, n - k))
        return Batch(blended, mask, mask.amax((1, 2, 3)).long())

    def _noise(self, p: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Every Perlin map of the batch: k masks, then 3k texture channels. (R, h, w)."""
        side = self.side
        parts = [OCTAVES, OCTAVES, 2 * OCTAVES]
        if "lattice" in p:
            y, x = axis_weights(h, *p["lattice"].split(parts, 2), side).chunk(2, dim=1)
        else:
            y = axis_weights(h, *p["lattice_y"].split(parts, 2), side)
            x = axis_weights(w, *p["lattice_x"].split(parts, 2), side)
        return lattice_noise(y, x, p["gradients"])

    def _foreign(self, noise: torch.Tensor, colours: list[torch.Tensor], p: dict[str, torch.Tensor], k: int, h: int,
                 w: int) -> torch.Tensor:
        """The unrelated image of each source: from the bank, else coloured fractal noise (two
        random colours per sample mixed by per-channel fractal noise, as
        :func:`~pouta_core.synthesis.sources.procedural_texture`)."""
        if self.bank is not None:
            index = p["texture"].long().to(self.bank.device)
            return self.bank.index_select(0, index).to(noise.device).float().div_(255)
        flat = noise.view(3 * k, h * w)
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)   # (aminmax is slower on a CPU)
        mix = (flat - lo).div_((hi - lo).clamp_min_(1e-6)).view(k, 3, h, w)
        first, second = colours
        return torch.lerp(first, second, mix)

    @staticmethod
    def _augment(x: torch.Tensor, p: dict[str, torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """Each source's three augmentations, one pass per kind (see the module's decisions)."""
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if "sharp" in p:
            index = p["sharp"].long()
            x = x.index_copy_(0, index, sharpen(x.index_select(0, index), p["sharp_w"]).clamp_(0, 1))
        if "hue" in p:
            index = p["hue"].long()
            coloured = saturate_and_shift_hue(x.index_select(0, index), p["saturation"], p["hue_shift"])
            x = x.index_copy_(0, index, coloured)
        return apply_tables(x, p["tables"])


def foreground_mask_batch(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`~pouta_core.synthesis.foreground_mask` for a batch. (B, 1, H, W)."""
    return _foreground(images, threshold).float()


def _foreground(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose grey differs from the median grey of the image's 4-pixel border by more
    than ``threshold`` (the border as the per-sample path reads it: four strips, the corners
    twice). (B, 1, H, W) bool; a fixed number of ops."""
    n, _, h, w = images.shape
    grey = images.mean(1, keepdim=True)
    border = grey.flatten(1).index_select(1, _border_pixels(h, w, images.device))
    return (grey - border.median(1).values.view(n, 1, 1, 1)).abs_() > threshold


@functools.lru_cache(maxsize=16)
def _border_pixels(h: int, w: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(h * w, device=device).view(h, w)
    return torch.cat([index[:4].flatten(), index[-4:].flatten(), index[:, :4].flatten(), index[:, -4:].flatten()])
