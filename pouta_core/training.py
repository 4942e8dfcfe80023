"""The training loop: ``fit``, a loop a reader sees at once, around named steps (``new_state``,
``restore``, ``train_epoch``, ``evaluate_splits``, ``save``); plain PyTorch.

Adam + MultiStepLR (per epoch), AMP on CUDA, synthesis inside the data pipeline, evaluation
every ``eval_every`` epochs, atomic checkpoints every ``checkpoint_every`` epochs. Every
random draw comes from generators seeded by (seed, epoch[, index]), so resuming from a
checkpoint continues exactly the run that was interrupted.

The orchestrator wraps it through three hooks: ``report(metrics, checkpoint_dir)`` after each
evaluation, ``wrap_model`` (e.g. DDP) and ``shard`` (this rank's slice of every epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pouta_core import checkpoint as ckpt
from pouta_core import runfolder
from pouta_core.config import Config, ConfigError
from pouta_core.data.datasets import BatchedLoader, EpochSampler, EvalDataset, TrainDataset
from pouta_core.inference import predict
from pouta_core.losses import pouta_loss
from pouta_core.metrics import compute, decision_threshold, operating_point
from pouta_core.model import build_model
from pouta_core.scoring_choice import CHOICE_FILE, choose_scoring
from pouta_core.synthesis import AnomalySynthesizer, TextureFolder
from pouta_core.synthesis.batched import BatchSynthesizer

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], Path | None], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def score_set(model: nn.Module, dataset: EvalDataset, device: torch.device, *, calibrate: bool = False,
              batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """-> (image scores (N,), anomaly maps (N, H, W)). With ``calibrate`` (validation sets
    only) the model's score normalisation is first set from the set's good images, and those
    are scored leave-one-out (``Scorer.calibrate``); without ``score_norm`` it changes nothing."""
    scores, maps = predict(model, dataset.images, device=device, batch_size=batch_size)
    if calibrate and model.scorer.norm != "none":
        scores = model.scorer.calibrate(maps, dataset.labels.numpy())
    return scores, maps


def evaluate(model: nn.Module, test_set: EvalDataset, device: torch.device, batch_size: int = 16, *,
             calibrate: bool = False, false_alarms: float | None = None,
             threshold: float | None = None) -> tuple[dict[str, float], float]:
    """-> (metrics of pouta_core.metrics.compute with the ``false_alarm_rate`` and ``miss_rate``
    of the image decision, the image threshold). The threshold is ``threshold`` when given (the
    one chosen on validation, applied to another split), else set on these images: the lowest
    that flags at most ``false_alarms`` of the good ones, or the F1-max when None."""
    scores, maps = score_set(model, test_set, device, calibrate=calibrate, batch_size=batch_size)
    labels = test_set.labels.numpy()
    metrics = compute(scores, labels, maps, test_set.masks[:, 0].numpy())
    if threshold is None:
        threshold = decision_threshold(scores, labels, false_alarms)
    return {**metrics, **operating_point(scores, labels, threshold)}, threshold


def evaluate_splits(model: nn.Module, val_set: EvalDataset | None, test_set: EvalDataset | None,
                    device: torch.device, false_alarms: float | None = None) -> tuple[dict[str, float], float | None]:
    """``val_<metric>`` and ``test_<metric>`` -> (metrics, threshold). The threshold (``false_alarms``:
    the false-alarm budget of ``Config.threshold_policy``, None for the F1-max) and the score
    normalisation come from validation only; ``test_false_alarm_rate``/``test_miss_rate`` are
    that threshold's on test, reported like every test metric, never used."""
    metrics: dict[str, float] = {}
    threshold = None
    if val_set is not None and len(val_set):
        val, threshold = evaluate(model, val_set, device, calibrate=True, false_alarms=false_alarms)
        threshold = threshold if math.isfinite(threshold) else None
        metrics.update({f"val_{k}": v for k, v in val.items()})
        if test_set is val_set:   # val_split=none: one set, scored once
            metrics.update({f"test_{k}": v for k, v in val.items()})
    if test_set is not None and test_set is not val_set and len(test_set):
        test, _ = evaluate(model, test_set, device, threshold=float("nan") if threshold is None else threshold)
        metrics.update({f"test_{k}": v for k, v in test.items()})
    return metrics, threshold


def check_scoring_data(config: Config, val_set: EvalDataset | None) -> None:
    """``score_norm`` needs good images in the validation set; refuse before training."""
    if config.score_norm == "none":
        return
    good = 0 if val_set is None else int((val_set.labels == 0).sum())
    if good < 2:
        raise ConfigError(f"config key 'score_norm': {config.score_norm} needs at least 2 good validation "
                          f"images, the validation split has {good}")


def _diff_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@dataclass
class TrainState:
    """What one epoch hands to the next, and what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0                                # last finished epoch
    threshold: float | None = None                # image threshold on validation (config.threshold_policy)
    metrics: dict[str, Any] = field(default_factory=dict)   # of the last evaluation
    nonfinite_epochs: int = 0                     # epochs in a row with no finite step (not saved)

    def to_checkpoint(self, config: Config, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "config": config.to_dict(), "threshold": self.threshold,
                "metrics": {k: float(v) for k, v in metrics.items()}}


def new_state(config: Config, device: torch.device, world: int = 1) -> TrainState:
    """Model, Adam and MultiStepLR (per epoch), and the AMP scaler (on CUDA only), seeded;
    Adam's learning rate is :func:`worker_lr` for ``world`` workers."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    # Fused on CUDA: one kernel per step, and a step skipped on the device (found_inf) without
    # the host reading anything (:func:`optimizer_step`). The same algorithm as on the CPU.
    optimizer = torch.optim.Adam(model.parameters(), lr=worker_lr(config, world),
                                 fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones),
                                                     gamma=config.lr_factor)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Loss scaling only for float16: bfloat16 has float32's range.
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(config, device) == torch.float16)
    return TrainState(model, optimizer, scheduler, scaler)


def worker_lr(config: Config, world: int) -> float:
    """The learning rate ``world`` workers train with: ``lr``, times ``world`` with
    ``scale_lr: linear``.

    *Decision* (issue 29): ``none`` by default. Linear scaling (Goyal et al., 2017) is a rule
    for SGD at large batches; Adam's steps do not grow with the gradient's scale, and POUTA's
    recipe was set for one worker, so the rule is offered, said at start, and never applied
    silently. A resumed run keeps the rate its checkpoint holds (Adam's and the scheduler's
    state), whatever the workers now."""
    return config.lr * world if config.scale_lr == "linear" and world > 1 else config.lr


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast type of training steps: ``amp_dtype`` with ``amp`` on CUDA, else None.

    *Decision* (issue 29): ``auto`` (the default) is bfloat16 where the GPU supports it: it has
    float32's range, so one overflowing step cannot make an epoch's loss non-finite, and it
    needs no loss scaling; float16 (with the scaler) on older GPUs. Before, float16 was the
    default everywhere, and had never run."""
    if not (config.amp and device.type == "cuda"):
        return None
    if config.amp_dtype == "auto":
        # Native bfloat16 only (Ampere and later): torch's default check also counts a GPU that
        # merely stores bfloat16 and emulates its arithmetic, which runs slower than float16
        # (issue 50; Volta, Turing).
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return getattr(torch, config.amp_dtype)


def use_device(device: torch.device) -> None:
    """What training on ``device`` sets once: on CUDA, cuDNN's autotuner (every batch has the
    same shape, ``image_size`` square, so the convolution algorithms it picks on the first
    steps hold for the run; issue 50: never set before)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def training_net(state: TrainState, config: Config, wrap_model: Callable[[nn.Module], nn.Module] | None = None
                 ) -> nn.Module:
    """What the steps call: the model, wrapped (e.g. DDP) and, with ``compile``, compiled. It
    shares its parameters with ``state.model``, which is what checkpoints hold."""
    net = wrap_model(state.model) if wrap_model else state.model
    return torch.compile(net) if config.compile else net


def restore(state: TrainState, path: Path, config: Config, device: torch.device, *,
            free: tuple[str, ...] = ()) -> None:
    """Load ``path`` into ``state``; refuse a checkpoint trained with another config (but for
    the runtime keys and ``free``: the scoring keys of a run that chose them after training)."""
    saved = ckpt.load_state(path, device)
    # Through Config, so keys added since the checkpoint was written compare as defaults.
    changed = [k for k in _diff_keys(Config.from_dict(saved["config"]).to_dict(), config.to_dict())
               if k not in Config.RUNTIME_KEYS and k not in free]
    if changed:
        raise ConfigError(f"{path}: was trained with a different config ({', '.join(changed)}); "
                          "use another --out or remove it")
    ckpt.load_weights(state.model, saved["model"], path)
    for name in ("optimizer", "scheduler"):
        getattr(state, name).load_state_dict(saved[name])
    # Adam's implementation is this device's (fused on CUDA), not the one the checkpoint was
    # written with: load_state_dict copies a group's "fused", and a CPU run resumed on a GPU
    # would hand the loss scaler's found_inf to an Adam that refuses it.
    for group in state.optimizer.param_groups:
        group["fused"] = state.optimizer.defaults.get("fused")
    load_scaler(state.scaler, saved.get("scaler") or {}, path)
    state.epoch, state.threshold = int(saved["epoch"]), saved.get("threshold")
    state.metrics = dict(saved.get("metrics", {}))
    log.info("resuming %s after epoch %d", path, state.epoch)


def load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], path: Path) -> None:
    """The loss scale of a resumed run, when it was saved and is wanted.

    ``amp``/``amp_dtype`` may change on a resume (``Config.RUNTIME_KEYS``), and a run saved
    without loss scaling (on a CPU, with ``amp=false`` or bfloat16) holds ``{}``, which an
    enabled scaler refuses ("the source state dict is empty"): a CPU checkpoint resumed with
    float16 on a GPU crashed. *Decision*: an enabled scaler without a saved scale starts from
    its default (as a new run does, finding its scale within a few steps); a disabled one
    ignores a saved scale (``GradScaler.load_state_dict`` does nothing when disabled)."""
    if saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        log.info("%s: saved without loss scaling; float16 starts from the default scale %g", path,
                 scaler.get_scale())


def train_step(state: TrainState, net: nn.Module, batch: dict[str, torch.Tensor], config: Config,
               device: torch.device, *, rec_only: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on a batch of ``TrainDataset`` samples -> (the loss terms, detached;
    whether the step was finite: a 0-dim bool tensor on the device, never read here).
    ``rec_only`` (staged training's first stage): the step minimises the reconstruction loss
    alone, so the discriminator's parameters get no gradient and Adam leaves them as they are.

    A step whose loss or gradient is not finite changes nothing (issue 29): with float16 the
    loss scaler skips it, as it skips the steps that find its scale; otherwise Adam's step is
    skipped (:func:`optimizer_step`). The gradient decides, after DDP's all-reduce, so every
    rank skips the same steps. :func:`train_epoch` counts them and stops a run that repeats them."""
    image, clean, mask = (batch[k].to(device, non_blocking=True) for k in ("image", "clean", "mask"))
    if config.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(config, device)
    with torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext():
        out = net(image)
    terms = pouta_loss(out, clean, mask, config)
    loss = terms["rec"] if rec_only else terms["total"]
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.is_enabled():
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        finite = torch.isfinite(loss)
    else:
        loss.backward()
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss) & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        optimizer_step(state.optimizer, finite)
    return {k: v.detach() for k, v in terms.items()}, finite


def optimizer_step(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``finite`` (a 0-dim bool tensor) is False. A fused Adam (on
    CUDA) gets the flag as ``found_inf``, the protocol ``GradScaler`` uses, and skips on the
    device: no host read. Elsewhere the flag is read (on a CPU that costs nothing)."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif bool(finite):
        optimizer.step()


def make_loader(images: torch.Tensor, config: Config, *, textures: TextureFolder | None, batch_size: int,
                shard: tuple[int, int], num_workers: int, device: torch.device) -> BatchedLoader | DataLoader:
    """One loader for the whole run, batches in :class:`EpochSampler` order. ``synthesis:
    batched``: anomalies made for the whole batch on ``device`` (``num_workers`` unused);
    ``per_sample``: a DataLoader over :class:`TrainDataset` with ``num_workers`` persistent
    worker processes (started once, not per epoch, sharing one decoded texture bank) and
    pinned memory on CUDA."""
    sampler = EpochSampler(len(images), config.seed, shard)
    if config.synthesis == "batched":
        bank = textures.bank().to(device) if textures is not None else None
        return BatchedLoader(images, BatchSynthesizer(config, bank), sampler, batch_size, device)
    if textures is not None and num_workers > 0:
        # Decoded here, before the workers fork: they read the parent's one copy (issue 50
        # item 7; each decoded and kept its own, ~850 MB of DTD at 224 per worker).
        textures.bank(progress=True)
    dataset = TrainDataset(images, AnomalySynthesizer(config, textures), config.seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")


# A run stops when an epoch skips more than this share of its steps (with at least
# NONFINITE_MIN_STEPS steps), or when NONFINITE_EPOCHS epochs in a row have no finite step.
NONFINITE_SHARE, NONFINITE_MIN_STEPS, NONFINITE_EPOCHS = 0.5, 4, 3


def train_epoch(state: TrainState, net: nn.Module, loader: DataLoader, config: Config, epoch: int, *,
                device: torch.device) -> dict[str, Any]:
    """One epoch over this rank's slice of the epoch's seeded permutation -> loss_* means (over
    its finite steps), ``nonfinite_steps``, epoch, lr. The loss terms are summed on the device
    and read once, at the end of the epoch. Epochs up to ``rec_warmup_epochs`` train the
    reconstructive network alone (staged training; the epoch number decides, so a resumed run
    is in the same stage as an uninterrupted one)."""
    net.train()
    loader.sampler.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    steps = 0
    rec_only = epoch <= config.rec_warmup_epochs
    for batch in loader:
        terms, finite = train_step(state, net, batch, config, device, rec_only=rec_only)
        for k, v in terms.items():
            kept = torch.where(finite, v.float(), torch.zeros((), device=v.device))
            sums[k] = sums[k] + kept if k in sums else kept
        skipped += ~finite
        steps += 1
    state.scheduler.step()
    state.epoch = epoch
    read = torch.stack([skipped.float(), *sums.values()]).tolist() if sums else [0.0]   # the one read
    bad, good = int(read[0]), steps - int(read[0])
    metrics: dict[str, Any] = {f"loss_{k}": v / good if good else math.nan
                               for k, v in zip(sums, read[1:], strict=True)}
    metrics.update(epoch=epoch, lr=state.optimizer.param_groups[0]["lr"], nonfinite_steps=bad)
    _check_nonfinite(state, epoch, bad, steps)
    return metrics


def _check_nonfinite(state: TrainState, epoch: int, bad: int, steps: int) -> None:
    """Log an epoch's skipped steps; stop a run whose non-finite steps repeat.

    *Decision* (issue 29): one overflowing step (float16 activations, a pathological batch) is
    skipped and counted (``nonfinite_steps``, logged with the epoch's losses); before, it made
    the epoch's mean loss non-finite and aborted the run. A run that skips most of an epoch, or
    learns nothing for three epochs, has diverged: it stops with an error as before."""
    if not bad:
        state.nonfinite_epochs = 0
        return
    log.warning("epoch %d: %d of %d steps skipped (a non-finite loss or gradient)", epoch, bad, steps)
    state.nonfinite_epochs = state.nonfinite_epochs + 1 if bad == steps else 0
    mostly = steps >= NONFINITE_MIN_STEPS and bad > NONFINITE_SHARE * steps
    if mostly or state.nonfinite_epochs >= NONFINITE_EPOCHS:
        raise FloatingPointError(f"training diverged at epoch {epoch}: {bad} of {steps} steps had a non-finite "
                                 f"loss or gradient ({state.nonfinite_epochs} epochs in a row without a finite "
                                 "step); lower lr, or amp_dtype=bfloat16 / amp=false if float16 overflows")


def save(state: TrainState, out_dir: Path, config: Config, metrics: dict[str, Any], *,
         extra_state: dict[str, Any] | None = None, sidecars: dict[str, dict[str, Any]] | None = None) -> Path:
    """``state`` as the run folder ``out_dir`` (:func:`write_run`); ``sidecars`` are JSON
    files kept in the checkpoint too."""
    saved = {**state.to_checkpoint(config, metrics), **(extra_state or {}), "sidecars": dict(sidecars or {})}
    return write_run(out_dir, saved, config)


def write_run(out_dir: str | Path, saved: dict[str, Any], config: Config) -> Path:
    """``checkpoint.pt`` holding ``saved``, then its views ``config.yaml``, ``metrics.json``
    and the checkpoint's JSON sidecars. The views are removed just before the new checkpoint
    replaces the old one, so a kill never leaves views of another state (``runfolder.repair``
    writes missing ones back)."""
    out_dir = Path(out_dir)
    views = runfolder.sidecars_of(saved)

    def drop_views() -> None:
        for name in (ckpt.CONFIG, *views):
            (out_dir / name).unlink(missing_ok=True)

    ckpt.save_checkpoint(out_dir, saved, before_replace=drop_views)
    config.to_yaml(out_dir / ckpt.CONFIG)
    for name, data in views.items():
        ckpt.write_json(out_dir / name, data)
    return out_dir


FEW_STEPS = 4


def _batch_size(config: Config, n: int, world: int) -> int:
    """``batch_size`` per worker (capped by the images a worker has); what the workers make of
    the recipe is said once: the global batch and the optimiser steps per epoch.

    *Decision* (issue 29): ``batch_size`` is per worker, with the same lr, epochs and
    milestones, so ``world`` workers take ``world`` times fewer Adam steps per epoch on a
    ``world`` times larger batch: another recipe (8 workers on toothbrush: one step of 7 images
    per epoch). Not rescaled silently; said, with a warning below a few steps per epoch."""
    size = min(config.batch_size, max(1, n // world))
    if size < config.batch_size:
        log.warning("batch_size %d is more than the %d training images per rank: using %d",
                    config.batch_size, n // world, size)
    steps = max(1, (n // world) // size)   # per rank, last partial batch dropped
    if world > 1:
        log.info("batch_size %d per worker x %d workers: global batch %d, %d optimiser step(s) per epoch "
                 "over %d images, lr %g (scale_lr %s)", size, world, size * world, steps, n, worker_lr(config, world),
                 config.scale_lr)
        if steps < FEW_STEPS:
            log.warning("%d worker(s) leave %d optimiser step(s) per epoch over %d images (one worker: %d): the "
                        "schedule (epochs, lr_milestones) was set for more steps; use fewer workers per "
                        "category (one category per GPU) or a smaller batch_size", world, steps, n,
                        max(1, n // min(config.batch_size, n)))
    return size


def fit(
    config: Config,
    train_images: torch.Tensor,
    out_dir: str | Path,
    *,
    val_set: EvalDataset | None = None,
    test_set: EvalDataset | None = None,
    textures: TextureFolder | None = None,
    device: str | torch.device = "cpu",
    report: ReportFn | None = None,
    resume: bool = True,
    num_workers: int = 0,
    progress: bool = True,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    shard: tuple[int, int] = (0, 1),
    extra_state: dict[str, Any] | None = None,
    sidecars: dict[str, dict[str, Any]] | None = None,
    scoring_options: Mapping[str, Sequence[Any]] | None = None,
    scoring_metric: str = "val_pixel_ap",
) -> dict[str, Any]:
    """Train on ``train_images`` (N, 3, S, S) uint8 good images; write ``out_dir/checkpoint.pt``,
    ``config.yaml``, ``metrics.json`` and the JSON ``sidecars`` (rank 0 only). Every
    evaluation scores ``val_set`` (``val_*`` metrics and the stored threshold); those that
    write a checkpoint (every ``checkpoint_every`` epochs and the last) also score ``test_set``
    (``test_*``, only reported). With ``scoring_options`` (scoring key -> values),
    the last evaluation first chooses among them on ``val_set`` by ``scoring_metric``
    (:mod:`pouta_core.scoring_choice`): the final checkpoint's config holds the choice and its
    folder ``scoring_choice.json`` every candidate. Returns the final metrics dict."""
    out_dir, device = Path(out_dir), torch.device(device)
    use_device(device)
    is_main = shard[0] == 0
    if len(train_images) < 2:
        raise ConfigError(f"need at least 2 training images, got {len(train_images)}")
    if is_main:
        check_scoring_data(config, val_set)
    state = new_state(config, device, world=shard[1])
    free = Config.SCORING_KEYS if scoring_options else ()
    if resume and (out_dir / ckpt.CHECKPOINT).exists():
        restore(state, out_dir / ckpt.CHECKPOINT, config, device, free=free)
        if report is not None and state.metrics:
            # A restored run first reports where it stands: the caller may have lost the report
            # made just before the interruption (Tune, MLflow drop epochs they already have).
            # Restored at its last epoch, it reports with the checkpoint: its final result.
            report({**state.metrics, "epoch": state.epoch},
                   out_dir if is_main and state.epoch >= config.epochs else None)
    net = training_net(state, config, wrap_model)
    batch_size = _batch_size(config, len(train_images), shard[1])
    loader = make_loader(train_images, config, textures=textures, batch_size=batch_size, shard=shard,
                         num_workers=num_workers, device=device)
    keep = {"extra_state": extra_state, "sidecars": sidecars}
    bar = tqdm(range(state.epoch + 1, config.epochs + 1), desc="training", disable=not (progress and is_main),
               initial=state.epoch, total=config.epochs)
    for epoch in bar:
        metrics = train_epoch(state, net, loader, config, epoch, device=device)
        bar.set_postfix(loss=f"{metrics['loss_total']:.4f}")
        last = epoch == config.epochs
        if epoch % config.eval_every == 0 or last:
            if is_main and last and scoring_options and val_set is not None and len(val_set):
                choice = choose_scoring(state.model, val_set, device, scoring_options, scoring_metric, config)
                config = config.replace(**choice.chosen)
                keep["sidecars"] = {**(sidecars or {}), CHOICE_FILE: choice.record()}
            checkpointing = epoch % config.checkpoint_every == 0 or last
            if is_main:
                # *Decision* (issue 50 item 5): test is scored with the weights a caller may
                # keep (every checkpoint, the last one included), not at every evaluation:
                # ASHA, Optuna and the best trial read validation only, and test scored every
                # eval_every epochs cost a second pass over every pixel that nothing read. A
                # trial is chosen and registered by the metrics of its checkpoint, so the
                # weights it holds always come with their test figures. Scoring test only
                # after the last epoch would leave an ASHA-stopped trial's checkpoint, which
                # can be the best, with none.
                scored_test = test_set if checkpointing or test_set is val_set else None
                evaluated, state.threshold = evaluate_splits(state.model, val_set, scored_test, device,
                                                             config.false_alarm_budget())
                metrics.update(evaluated)
            checkpoint_dir = None
            if is_main and checkpointing:
                checkpoint_dir = save(state, out_dir, config, metrics, **keep)
            state.metrics = metrics
            if report is not None:
                report(metrics, checkpoint_dir)
        elif is_main and epoch % config.checkpoint_every == 0:
            save(state, out_dir, config, {**state.metrics, **metrics}, **keep)
    return {**state.metrics, "threshold": state.threshold}
