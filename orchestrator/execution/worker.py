"""What every worker of a trial runs: pouta_core's training loop, wrapped.

Two sessions run it. A trial with several workers is a Ray Train run (``TrainSession``): DDP
through ``prepare_model``, this rank's slice of every epoch through ``shard``,
``ray.train.report`` with a checkpoint on every evaluation epoch (the same number of calls on
every rank; rank 0 attaches the checkpoint), resumption from Ray Train's latest checkpoint.
A one-worker trial runs the same function inside the Tune trial's own process
(``TuneSession``: ``ray.tune.report``, Tune's checkpoints and retries).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import ray.tune
import torch

from orchestrator.execution.results import SCORING, packed
from orchestrator.execution.schedulers import checkpoint_folders
from orchestrator.spec import CHECKPOINT_EPOCH, WorkerTask
from pouta_core import checkpoint as ckpt
from pouta_core.api import load_category
from pouta_core.benchmark import latency_ms
from pouta_core.config import Config, ConfigError
from pouta_core.data.images import set_max_image_pixels
from pouta_core.inference import predict
from pouta_core.model import build_model
from pouta_core.synthesis import TextureFolder
from pouta_core.training import fit
from pouta_core.visualize import heatmap_grid, save_grid, select_examples

HEATMAPS = "heatmaps.png"
# Local run folders are named after their worker's PID: a worker killed by ASHA or a lost
# driver cannot clean up, so the next worker on the node removes folders of dead PIDs.
RUN_DIR_PREFIX = "pouta-run-"


def remove_stale_run_dirs(root: str | None = None) -> list[Path]:
    """Remove ``RUN_DIR_PREFIX<pid>-*`` folders in the temp folder whose process is gone."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def measure_latency(config: Config, device: torch.device, runs: int = 10) -> float:
    """Median batch-1 forward time in ms; it depends on the architecture, not the weights."""
    model = build_model(config).to(device).eval()
    x = torch.rand(1, 3, config.image_size, config.image_size, device=device)
    return latency_ms(model, x, runs=runs, warmup=2)


def write_heatmaps(run_dir: Path, test_set, device: torch.device) -> None:
    model, _, _ = ckpt.load_model(run_dir, device)
    scores, maps = predict(model, test_set.images, device=device)
    labels = test_set.labels.numpy()
    idx = select_examples(labels, scores)
    grid = heatmap_grid(test_set.images[idx].numpy(), maps[idx], test_set.masks[idx, 0].numpy(), scores[idx])
    ckpt.atomic_write(run_dir / HEATMAPS, lambda fh: save_grid(grid, fh))


class TrainSession:
    """A Ray Train worker's view of its run."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def prepare_model(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        kwargs = {"find_unused_parameters": True} if find_unused_parameters else None
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)


class TuneSession:
    """A one-worker trial, run in the Tune trial's process (rank 0 of 1, no DDP)."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool) -> None:
        # Tune gives a trial that asked for a GPU its own CUDA_VISIBLE_DEVICES.
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def get_checkpoint(self):
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    def prepare_model(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        return model


def train_worker(task: WorkerTask, session: TrainSession | TuneSession | None = None) -> None:
    """Train ``task``'s category; ``session``: where it reports (default: the Ray Train run it
    is a worker of)."""
    session = session or TrainSession()
    config, data_spec = task.config, task.data
    rank, world, device = session.rank, session.world, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(task.resources.cpus_per_worker)))
    if data_spec.max_image_pixels is not None:   # the driver's --max-image-pixels, in this process too
        set_max_image_pixels(data_spec.max_image_pixels)
    data = load_category(data_spec.root, data_spec.dataset, task.category, config, cache_dir=data_spec.cache_dir,
                         progress=False)
    textures = TextureFolder(data_spec.texture_dir, config.image_size) if data_spec.texture_dir else None
    # The grid shows test images when there are any: a picture, never a choice.
    shown = data.test_set if data.test_set is not None else data.val_set
    latency = measure_latency(config, device)

    remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-{task.category}-rank{rank}-"))
    note = restore_into(run_dir, session.get_checkpoint())
    if note:
        print(f"trial {task.category}: {note}", flush=True)
    # The epoch of the checkpoint this trial would resume from, in every report: a report
    # without a checkpoint (checkpoint_every > eval_every) says which one the trial holds. A
    # restored trial's first report is the epoch of the checkpoint it restored.
    held = {"epoch": None if (run_dir / ckpt.CHECKPOINT).exists() else 0}

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None or held["epoch"] is None:
            held["epoch"] = int(metrics.get("epoch", 0))
        metrics = {**metrics, "latency_ms": latency, CHECKPOINT_EPOCH: held["epoch"]}
        reported = packed({k: v for k, v in metrics.items() if _reportable(v)}, task.tune_metrics)
        if checkpoint_dir is not None and metrics.get("epoch", 0) >= config.epochs:
            # The final checkpoint only (issue 28): a grid is a second pass over the test images,
            # and a trial ASHA stops is not one anybody registers.
            write_heatmaps(checkpoint_dir, shown, device)
            if task.scoring_options:   # what the trial chose after training: its final config holds it
                final = Config.from_yaml(checkpoint_dir / ckpt.CONFIG)
                reported[SCORING] = json.dumps({k: getattr(final, k) for k in task.scoring_options})
        session.report(reported, checkpoint_dir)

    def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
        # Staged training's first epochs leave the discriminator without gradients, which DDP
        # only accepts when told to look for unused parameters (a cost paid only then).
        return session.prepare_model(model, find_unused_parameters=config.rec_warmup_epochs > 0)

    try:
        fit(config, data.train_images, run_dir, val_set=data.val_set if rank == 0 else None,
            test_set=data.test_set if rank == 0 else None, textures=textures, device=device, report=report,
            progress=False, wrap_model=wrap_model, shard=(rank, world),
            num_workers=task.resources.loader_workers,
            extra_state={"dataset": data_spec.dataset, "category": task.category, "val_split": data.selection.mode,
                         ckpt.BIT_DEPTH: data.bit_depth},
            sidecars={ckpt.VAL_FILES: data.selection_record()},
            scoring_options=task.scoring_options, scoring_metric=task.scoring_metric)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def restore_into(run_dir: Path, checkpoint: ray.train.Checkpoint | None) -> str | None:
    """Copy the trial's latest ``checkpoint`` (Tune's or Ray Train's) into ``run_dir`` -> a note
    when another one had to be used, else None.

    Tune removes checkpoints beyond ``num_to_keep`` as new ones are reported, and saves the
    experiment state that names the latest only every few seconds: a driver killed in between
    restores a trial whose recorded checkpoint is gone, and every retry failed the same way.
    *Decision*: the trial then continues from the newest checkpoint in the same folder that
    loads (Ray numbers them ``checkpoint_000007``), or starts over when none does; either way
    it says so (the trial's log line reaches the driver's output)."""
    if checkpoint is None:
        return None
    import posixpath

    import pyarrow.fs as pafs

    fs, recorded = checkpoint.filesystem, checkpoint.path
    if fs.get_file_info(posixpath.join(recorded, ckpt.CHECKPOINT)).type == pafs.FileType.File:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, run_dir, dirs_exist_ok=True)
        return None
    folder, name = posixpath.split(recorded.rstrip("/"))
    for candidate in reversed(checkpoint_folders(fs, folder)):
        if fs.get_file_info(posixpath.join(candidate, ckpt.CHECKPOINT)).type != pafs.FileType.File:
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        try:
            with ray.train.Checkpoint(candidate, filesystem=fs).as_directory() as d:
                shutil.copytree(d, run_dir, dirs_exist_ok=True)
            ckpt.load_state(run_dir / ckpt.CHECKPOINT)   # one cut by the kill does not load
        except (OSError, ConfigError):   # unreadable (cut by the kill): try the next older one
            continue
        return f"its checkpoint {name} is gone; continuing from {posixpath.basename(candidate)}, the newest on disk"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return f"its checkpoint {name} is gone and no other loads; starting over"


def _reportable(v: Any) -> bool:
    return isinstance(v, int | float | np.floating) and not isinstance(v, bool)
