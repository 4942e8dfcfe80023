"""Single-machine train / evaluate / predict / export, as the CLI and the orchestrator call
them. Plain functions over paths; no Ray, no MLflow."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pouta_core import checkpoint as ckpt
from pouta_core import runfolder
from pouta_core.bootstrap import Evidence
from pouta_core.config import Config, ConfigError
from pouta_core.data import EvalDataset, ImageCache, decode, read_split
from pouta_core.data.errors import DataError
from pouta_core.data.images import bit_depth_of, list_images, model_input, read_rgb, warn_about
from pouta_core.data.validation import SelectionSplit, split_for_selection, synthetic_validation
from pouta_core.inference import ExportWrapper, predict, resize_map
from pouta_core.metrics import compute, decision_threshold, f1_max, operating_point
from pouta_core.serving import decision_line, threshold_policy
from pouta_core.synthesis import TextureFolder
from pouta_core.training import ReportFn, evaluate_splits, fit, resolve_device, score_set, write_run
from pouta_core.visualize import overlay

log = logging.getLogger(__name__)


@dataclass
class CategoryData:
    """A category decoded for training: the images trained on, the validation set every
    choice is made on, and the test set that is only reported (None when the category has
    no labelled test images)."""

    train_images: torch.Tensor
    val_set: EvalDataset
    test_set: EvalDataset | None
    selection: SelectionSplit
    val_files: list[str]
    bit_depth: int = 16     # what 16-bit grey files were scaled by (Config.bit_depth, resolved)

    def selection_record(self) -> dict[str, Any]:
        """What ``val_files.json`` holds: the resolved split and its validation images."""
        return {"val_split": self.selection.mode, "val_files": self.val_files,
                "test_images": 0 if self.test_set is None else len(self.test_set)}


def load_category(data_root: str | Path, dataset: str, category: str, config: Config, *,
                  cache_dir: str | Path | None = None, progress: bool = True,
                  bit_depth: int | None = None) -> CategoryData:
    """Read the layout, validate it, split it for selection (``config.val_split`` /
    ``val_ratio``), decode every image once (through the cache). 16-bit grey files are scaled
    by ``bit_depth`` (a trained model's, :func:`pouta_core.checkpoint.bit_depth`), else by
    ``config.bit_depth`` (``auto``: found from the training images)."""
    split = read_split(data_root, dataset, category)
    parts = split_for_selection(split, data_root, config.val_split, config.val_ratio,
                                where=f"{data_root} [{category}]")
    if bit_depth is None:
        bit_depth = bit_depth_of(s.path for s in parts.train) if config.bit_depth == "auto" else int(config.bit_depth)
        if bit_depth != 16:
            log.info("%s [%s]: 16-bit images use %d bits: scaled by 2^%d (bit_depth=%s)", data_root, category,
                     bit_depth, bit_depth - 8, config.bit_depth)
    cache = ImageCache(config.image_size, cache_dir, bits=bit_depth)

    def labelled(samples, what: str) -> EvalDataset:
        return EvalDataset(*decode(samples, cache, desc=f"{category}: {what} images", progress=progress))

    train_images, _, _ = decode(parts.train, cache, desc=f"{category}: train images", progress=progress)
    if parts.mode == "synthetic":
        held, _, _ = decode(parts.val, cache, desc=f"{category}: validation images", progress=progress)
        val_set = synthetic_validation(held, config)
    else:
        val_set = labelled(parts.val, "validation")
    test_set = labelled(parts.test, "test") if parts.test else None
    if parts.mode == "none":
        test_set = val_set   # one set, scored once (fit sees the identity)
    return CategoryData(train_images, val_set, test_set, parts, parts.val_files(data_root), bit_depth)


def fingerprint_category(data_root: str | Path, dataset: str, category: str) -> str:
    """sha256 of a category's training images (relative paths and contents): what decides
    whether a retrain is due, and whether a run folder may be resumed."""
    split = read_split(data_root, dataset, category)
    return runfolder.fingerprint([s.path for s in split.train], Path(data_root))


def train(config: Config, *, data_root: str | Path, dataset: str, category: str, out: str | Path,
          device: str = "auto", texture_dir: str | Path | None = None, cache_dir: str | Path | None = None,
          report: ReportFn | None = None, num_workers: int = 0, progress: bool = True,
          resume: bool = True, lock: bool = True, **fit_kwargs: Any) -> dict[str, Any]:
    """Train one category into the run folder ``out`` (``pouta_core.runfolder``): held by
    this process (``lock``), repaired after a kill, resumed only for the same dataset,
    category, training images and config."""
    out = Path(out)
    if lock:
        runfolder.check_free(out)          # refuse at once, before decoding anything
    dev = resolve_device(device)
    data = load_category(data_root, dataset, category, config, cache_dir=cache_dir, progress=progress)
    textures = TextureFolder(texture_dir, config.image_size) if texture_dir else None
    identity = {"dataset": dataset, "category": category,
                "data_fingerprint": fingerprint_category(data_root, dataset, category)}
    if resume:
        runfolder.check_identity(out, identity)    # before claiming: a refusal writes nothing
    with runfolder.claim(out) if lock else contextlib.nullcontext():
        runfolder.repair(out)
        return fit(config, data.train_images, out, val_set=data.val_set, test_set=data.test_set,
                   textures=textures, device=dev, report=report, num_workers=num_workers, progress=progress,
                   resume=resume, extra_state={**identity, "val_split": data.selection.mode,
                                                      ckpt.BIT_DEPTH: data.bit_depth},
                   sidecars={ckpt.VAL_FILES: data.selection_record()}, **fit_kwargs)


def evaluate_checkpoint(checkpoint: str | Path, *, data_root: str | Path, dataset: str, category: str,
                        device: str = "auto", cache_dir: str | Path | None = None, split: str = "test",
                        progress: bool = True, by_defect: bool = False, scoring: list[str] | tuple = ()
                        ) -> dict[str, Any]:
    """Metrics of a checkpoint on ``split`` ("val" or "test") of a category, split as the
    checkpoint's config says (the images it was chosen on are its validation split). With
    ``by_defect``: ``{"all": metrics, "by_defect": {defect type: metrics on that type and the
    split's good images}}``, which says which kinds of defect a model misses. ``scoring``:
    ``key=value`` overrides of the scoring keys (``Config.SCORING_KEYS``), to re-score the
    trained model another way without retraining; the score normalisation is computed again
    from the validation split's good images (which, on ``--split val``, are each scored
    leave-one-out)."""
    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test, got '{split}'")
    dev = resolve_device(device)
    model, config, state = ckpt.load_model(checkpoint, dev, scoring=scoring)
    data = load_category(data_root, dataset, category, config, cache_dir=cache_dir, progress=progress,
                         bit_depth=ckpt.bit_depth(state))
    chosen = data.val_set if split == "val" else data.test_set
    if chosen is None or not len(chosen):
        raise DataError(f"{data_root}: category '{category}' has no labelled test images "
                        f"(val_split={data.selection.mode}); evaluate --split val")
    samples = data.selection.val if split == "val" or data.selection.mode == "none" else data.selection.test
    if by_defect and data.selection.mode == "synthetic" and split == "val":
        raise DataError(f"{data_root} [{category}]: the validation images are synthetic (no defect types); "
                        "use --split test")
    budget = config.false_alarm_budget()
    # The decision's threshold: the stored one; re-scored another way (``scoring``), the one the
    # policy sets again on validation (the stored one belongs to the other reading).
    stored = state.get("threshold")
    stored = float("nan") if stored is None else float(stored)
    if chosen is not data.val_set and (model.scorer.norm != "none" or scoring):
        val_scores, _ = score_set(model, data.val_set, dev, calibrate=True)   # the normalisation, from validation
        stored = decision_threshold(val_scores, data.val_set.labels.numpy(), budget) if scoring else stored
    scores, maps = score_set(model, chosen, dev, calibrate=chosen is data.val_set)
    labels = chosen.labels.numpy()
    if scoring and chosen is data.val_set:
        stored = decision_threshold(scores, labels, budget)
    metrics = {**_metrics_of(scores, maps, chosen), "f1_threshold": f1_max(scores, labels)[1],
               # the threshold threshold_policy sets on these images (on val: the stored one), and
               # what the decision's threshold does on them
               "policy_threshold": decision_threshold(scores, labels, budget),
               **operating_point(scores, labels, stored)}
    if not by_defect:
        return metrics
    defects = [s.defect for s in samples]
    good = [i for i, d in enumerate(defects) if d == "good"]
    return {"all": metrics, "by_defect": {
        kind: _metrics_of(scores, maps, chosen, good + [i for i, d in enumerate(defects) if d == kind])
        for kind in sorted(set(defects) - {"good"})}}


def rescore(checkpoint: str | Path, out: str | Path, *, scoring: list[str] | tuple, data_root: str | Path,
            dataset: str, category: str, device: str = "auto", cache_dir: str | Path | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write a new run folder ``out`` holding the trained model of ``checkpoint`` read as the
    scoring keys ``scoring`` say (``key=value``): the same weights, the score normalisation
    and the image threshold computed again on the validation split, and its validation and
    test metrics evaluated again. So a scoring option that ``evaluate --set`` found better is
    kept without retraining; ``predict``, ``export`` and registration then use it."""
    out = Path(out)
    if (out / ckpt.CHECKPOINT).exists():
        raise ConfigError(f"{out}: already holds a checkpoint; rescore writes a new run folder")
    runfolder.check_free(out)          # refuse at once, before decoding anything
    dev = resolve_device(device)
    model, config, state = ckpt.load_model(checkpoint, dev, scoring=scoring)
    for key, given in (("dataset", dataset), ("category", category)):
        if state.get(key, given) != given:
            raise ConfigError(f"{checkpoint}: was trained on {key} '{state[key]}', not '{given}'")
    data = load_category(data_root, dataset, category, config, cache_dir=cache_dir, progress=progress,
                         bit_depth=ckpt.bit_depth(state))
    metrics, threshold = evaluate_splits(model, data.val_set, data.test_set, dev, config.false_alarm_budget())
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    saved = {**state, "model": weights, "config": config.to_dict(), "threshold": threshold,
             "metrics": {**state.get("metrics", {}), **metrics}}
    with runfolder.claim(out):
        write_run(out, saved, config)
    return {**metrics, "threshold": threshold}


def _metrics_of(scores: np.ndarray, maps: np.ndarray, images: EvalDataset, rows: list[int] | None = None
                ) -> dict[str, float]:
    rows = slice(None) if rows is None else np.asarray(rows)
    return compute(scores[rows], images.labels.numpy()[rows], maps[rows], images.masks[:, 0].numpy()[rows])


def validation_evidence(checkpoint: str | Path, *, data_root: str | Path, dataset: str, category: str,
                        split_like: Config | None = None, device: str = "auto",
                        cache_dir: str | Path | None = None) -> tuple[Evidence, np.ndarray]:
    """A checkpoint's scores and maps on a category's validation images -> (evidence, labels).
    ``split_like``: take the split keys (val_split, val_ratio, foreground_threshold) from this
    config instead of the checkpoint's, so two models are scored on the same images."""
    dev = resolve_device(device)
    model, config, state = ckpt.load_model(checkpoint, dev)
    if split_like is not None:
        config = config.replace(val_split=split_like.val_split, val_ratio=split_like.val_ratio,
                                foreground_threshold=split_like.foreground_threshold)
    data = load_category(data_root, dataset, category, config, cache_dir=cache_dir, progress=False,
                         bit_depth=ckpt.bit_depth(state))
    scores, maps = score_set(model, data.val_set, dev, calibrate=True)
    return Evidence(scores, maps, data.val_set.masks[:, 0].numpy()), data.val_set.labels.numpy()


@dataclass
class Prediction:
    """What ``predict_paths`` did: one dict per scored image, and (path, reason) per image
    that could not be read (those are skipped, never silently)."""

    scored: list[dict[str, Any]]
    failed: list[tuple[str, str]]
    decision: str = ""    # which threshold decided and what set it (pouta_core.serving.decision_line)


def _inputs(paths: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, output name stem) per image: folders are searched recursively; outputs mirror
    each file's path below the deepest folder holding all inputs and keep its extension, so
    ``a/x.png``, ``b/x.png`` and ``a/x.jpg`` never write the same file."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(list_images(p, recursive=True))
        else:
            files.append(p)      # a missing one is reported as failed, with the others scored
    files = list(dict.fromkeys(f.resolve() for f in files))
    if not files:
        raise DataError(f"no images to predict in {', '.join(map(str, paths))}")
    base = Path(os.path.commonpath([f.parent for f in files]))
    return [(f, f.relative_to(base)) for f in files]


def _full_size_overlay(rgb: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """The heat map over the image at the file's own resolution (the map upsampled, bilinear)."""
    return overlay(rgb, resize_map(amap, rgb.shape[:2]))


def predict_paths(checkpoint: str | Path, paths: list[str | Path], out: str | Path, *,
                  threshold: float | None = None, save_maps: bool = False, device: str = "auto",
                  batch_size: int = 16) -> Prediction:
    """Score every readable image; write ``<name>.overlay.png`` (the heat map over the image at
    the image's own resolution) and with ``save_maps`` ``<name>.map.npy`` (the map at the
    model's input size) into ``out``, mirroring the inputs' folders. An image that cannot be read is reported
    in ``failed`` and the others are still scored. The decision uses ``threshold``, else
    the one stored at training time."""
    dev = resolve_device(device)
    model, config, state = ckpt.load_model(checkpoint, dev)
    ckpt.require_calibrated(model, checkpoint)
    decision, policy = decision_line(state, threshold), "request" if threshold is not None else threshold_policy(state)
    if threshold is None:
        threshold = state.get("threshold")
        if threshold is None:
            raise ConfigError(f"{checkpoint}: no threshold stored (trained without validation images to set "
                              "it on); pass --threshold")
    inputs = _inputs(paths)
    out = Path(out)
    scored, failed, readable = [], [], []
    for start in range(0, len(inputs), batch_size):
        # Each file is decoded once, per batch: scored at the model's size, drawn at its own.
        chunk = []
        for f, rel in inputs[start:start + batch_size]:
            try:
                chunk.append((f, rel, read_rgb(f, ckpt.bit_depth(state))))
            except DataError as exc:
                failed.append((str(f), str(exc).removeprefix(f"{f}: ")))
        if not chunk:
            continue
        readable += [f for f, _, _ in chunk]
        batch = torch.stack([model_input(rgb, config.image_size) for _, _, rgb in chunk])
        scores, maps = predict(model, batch, device=dev, batch_size=batch_size)
        for (f, rel, rgb), score, amap in zip(chunk, scores, maps, strict=True):
            target = out / rel.parent
            blended = Image.fromarray(_full_size_overlay(rgb, amap))
            overlay_path = target / f"{rel.name}.overlay.png"
            ckpt.atomic_write(overlay_path, lambda fh, im=blended: im.save(fh, format="PNG"))
            if save_maps:
                ckpt.atomic_write(target / f"{rel.name}.map.npy", lambda fh, a=amap: np.save(fh, a))
            scored.append({"image": str(f), "score": float(score), "anomalous": bool(score >= threshold),
                           "threshold": float(threshold), "threshold_policy": policy, "overlay": str(overlay_path)})
    warn_about(readable, config.image_size, "predict")
    return Prediction(scored, failed, decision)


def export(checkpoint: str | Path, fmt: str, out: str | Path, *, check: bool = True) -> dict[str, float]:
    """Export to ONNX or TorchScript (input (B, 3, S, S) in [0, 1]; outputs anomaly_map
    (B, 1, S, S) and score (B,)); then run both on a random input and return the largest
    absolute difference of the anomaly maps."""
    model, config, _ = ckpt.load_model(checkpoint, "cpu")
    ckpt.require_calibrated(model, checkpoint)
    wrapper = ExportWrapper(model).eval()
    s = config.image_size
    x = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    if fmt == "torchscript":
        with torch.inference_mode():
            traced = torch.jit.trace(wrapper, x[:1], check_trace=False)
        ckpt.atomic_write(out, lambda fh: torch.jit.save(traced, fh))
        exported = torch.jit.load(str(out))
        run = lambda t: tuple(o.detach().numpy() for o in exported(t))  # noqa: E731
    elif fmt == "onnx":
        import onnxruntime as ort

        tmp = out.with_name(f".{out.name}.tmp")
        try:
            torch.onnx.export(wrapper, (x[:1],), str(tmp), input_names=["image"],
                              output_names=["anomaly_map", "score"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", max=1024)}},
                              dynamo=True, external_data=False, verbose=False)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda t: tuple(session.run(["anomaly_map", "score"], {"image": t.numpy()}))  # noqa: E731
    else:
        raise ConfigError(f"unknown export format '{fmt}': choose onnx or torchscript")
    if not check:
        return {"max_abs_diff": float("nan"), "score_max_abs_diff": float("nan")}
    with torch.inference_mode():
        reference = [t.numpy() for t in wrapper(x)]
    got = run(x)
    return {"max_abs_diff": float(np.abs(got[0] - reference[0]).max()),
            "score_max_abs_diff": float(np.abs(got[1] - reference[1]).max())}
