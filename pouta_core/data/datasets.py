"""torch Datasets over a :class:`Split`: decoded once into uint8 tensors. Training batches come
from :class:`BatchedLoader` (synthesis for the whole batch on the training device, seeded by
(seed, epoch, rank, step)) or from a DataLoader over :class:`TrainDataset` (synthesis per
sample in loader workers, seeded by (seed, epoch, index)); either way every epoch is
reproducible whatever the number of loader workers or a resume in between."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from pouta_core.data.images import ImageCache, warn_about
from pouta_core.data.layouts import Sample
from pouta_core.synthesis import AnomalySynthesizer
from pouta_core.synthesis.batched import BatchSynthesizer, batch_seed, to_device


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def decode(samples: list[Sample], cache: ImageCache, *, desc: str = "decoding", progress: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> images (N, 3, S, S) uint8, masks (N, 1, S, S) uint8 0/1, labels (N,) int64.
    Warns once for the split (``desc``) about images with alpha or smaller than the input."""
    warn_about([s.path for s in samples], cache.size, desc)
    images, masks = [], []
    for s in tqdm(samples, desc=desc, disable=not progress, leave=False):
        img = cache.get(s.path)
        images.append(img)
        if s.mask is not None:
            masks.append(cache.get(s.mask, kind="mask", image_path=s.path))
        else:
            masks.append(torch.zeros(1, *img.shape[-2:], dtype=torch.uint8))
    if not samples:
        size = cache.size
        return (torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, 1, size, size, dtype=torch.uint8),
                torch.zeros(0, dtype=torch.int64))
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    return torch.stack(images), torch.stack(masks), labels


class EpochSampler(Sampler):
    """This rank's slice of the epoch's seeded permutation of a dataset, as ``(epoch, index)``
    pairs: every epoch is reproducible whatever the number of loader workers, persistent ones
    included (they hold their own copy of the dataset, so its ``set_epoch`` would not reach
    them), and however the ranks are split."""

    def __init__(self, n: int, seed: int, shard: tuple[int, int] = (0, 1)) -> None:
        self.n, self.seed, (self.rank, self.world) = n, seed, shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1) % 2**63)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        yield from ((self.epoch, i) for i in perm[self.rank * per_rank:(self.rank + 1) * per_rank].tolist())


class TrainDataset(Dataset):
    """Good images -> dict(image=I_in, clean=I_ori, mask=M, label), all float in [0, 1]."""

    def __init__(self, images: torch.Tensor, synthesizer: AnomalySynthesizer, seed: int) -> None:
        self.images = images
        self.synthesizer = synthesizer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``index`` (at the epoch of :meth:`set_epoch`) or ``(epoch, index)`` (what
        :class:`EpochSampler` yields: loader workers need no shared epoch state)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        clean = self.images[index].float() / 255.0
        out = self.synthesizer(clean, g)
        return {"image": out.image, "clean": clean, "mask": out.mask,
                "label": torch.tensor(out.label, dtype=torch.int64)}


class BatchedLoader:
    """Training batches for :func:`~pouta_core.training.train_epoch`, made on ``device``: the
    good images are moved there once (uint8), and each batch of :class:`EpochSampler`'s order
    is synthesised by a :class:`BatchSynthesizer` whose generator is seeded by (seed, epoch,
    rank, step). Yields what a DataLoader over :class:`TrainDataset` yields (image, clean,
    mask, label), already on ``device``; the last incomplete batch is dropped. Host-to-device
    copies: the epoch's order once, and each step's draws (one pinned, non-blocking copy)."""

    def __init__(self, images: torch.Tensor, synthesizer: BatchSynthesizer, sampler: EpochSampler,
                 batch_size: int, device: torch.device) -> None:
        self.images = images.to(device)
        self.synthesizer, self.sampler, self.batch_size = synthesizer, sampler, batch_size
        self.seed = sampler.seed

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        epoch = self.sampler.epoch
        # the epoch's order goes to the device once, without blocking: a step's rows are a
        # view of it (a copy per step from pageable memory made the host wait for the device)
        order = to_device(torch.tensor([i for _, i in self.sampler], dtype=torch.long), self.images.device)
        for step in range(len(self)):
            rows = order[step * self.batch_size:(step + 1) * self.batch_size]
            clean = self.images[rows].float() / 255.0
            g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, self.sampler.rank, step))
            out = self.synthesizer(clean, g)
            yield {"image": out.image, "clean": clean, "mask": out.mask, "label": out.label}


class EvalDataset(Dataset):
    def __init__(self, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.masks, self.labels = images, masks, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index].float() / 255.0, "mask": self.masks[index].float(),
                "label": self.labels[index]}
