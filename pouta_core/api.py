"""Single-machine train / evaluate / predict / export, as the CLI and the orchestrator call
them. Plain functions over paths; no Ray, no MLflow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pouta_core import checkpoint as ckpt
from pouta_core.config import Config, ConfigError
from pouta_core.data import EvalDataset, ImageCache, decode, load_image, read_split
from pouta_core.data.errors import DataError
from pouta_core.data.images import list_images
from pouta_core.inference import ExportWrapper, predict
from pouta_core.synthesis import TextureFolder
from pouta_core.training import ReportFn, evaluate, fit, resolve_device
from pouta_core.visualize import overlay

log = logging.getLogger(__name__)


@dataclass
class CategoryData:
    train_images: torch.Tensor
    test_set: EvalDataset


def load_category(data_root: str | Path, dataset: str, category: str, image_size: int, *,
                  cache_dir: str | Path | None = None, progress: bool = True) -> CategoryData:
    """Read the layout, validate it, decode every image once (through the cache)."""
    split = read_split(data_root, dataset, category)
    cache = ImageCache(image_size, cache_dir)
    train_images, _, _ = decode(split.train, cache, desc=f"{category}: train images", progress=progress)
    images, masks, labels = decode(split.test, cache, desc=f"{category}: test images", progress=progress)
    return CategoryData(train_images, EvalDataset(images, masks, labels))


def train(config: Config, *, data_root: str | Path, dataset: str, category: str, out: str | Path,
          device: str = "auto", texture_dir: str | Path | None = None, cache_dir: str | Path | None = None,
          report: ReportFn | None = None, num_workers: int = 0, progress: bool = True,
          resume: bool = True, **fit_kwargs: Any) -> dict[str, Any]:
    dev = resolve_device(device)
    data = load_category(data_root, dataset, category, config.image_size, cache_dir=cache_dir,
                         progress=progress)
    textures = TextureFolder(texture_dir, config.image_size) if texture_dir else None
    extra = {"dataset": dataset, "category": category}
    return fit(config, data.train_images, out, test_set=data.test_set, textures=textures, device=dev,
               report=report, num_workers=num_workers, progress=progress, resume=resume,
               extra_state=extra, **fit_kwargs)


def evaluate_checkpoint(checkpoint: str | Path, *, data_root: str | Path, dataset: str, category: str,
                        device: str = "auto", cache_dir: str | Path | None = None,
                        progress: bool = True) -> dict[str, float]:
    dev = resolve_device(device)
    model, config, _ = ckpt.load_model(checkpoint, dev)
    data = load_category(data_root, dataset, category, config.image_size, cache_dir=cache_dir,
                         progress=progress)
    if not len(data.test_set):
        raise DataError(f"{data_root}: category '{category}' has no test images")
    metrics, threshold = evaluate(model, data.test_set, dev)
    return {**metrics, "f1_threshold": threshold}


def predict_paths(checkpoint: str | Path, paths: list[str | Path], out: str | Path, *,
                  threshold: float | None = None, save_maps: bool = False, device: str = "auto",
                  batch_size: int = 16) -> list[dict[str, Any]]:
    """Score every image; write ``<stem>_overlay.png`` (and ``<stem>_map.npy``) into ``out``.
    The decision uses ``threshold``, else the one stored at training time."""
    dev = resolve_device(device)
    model, config, state = ckpt.load_model(checkpoint, dev)
    if threshold is None:
        threshold = state.get("threshold")
        if threshold is None:
            raise ConfigError(f"{checkpoint}: no threshold stored (trained without anomalous test "
                              "images); pass --threshold")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(list_images(p))
        else:
            files.append(p)
    if not files:
        raise DataError("no images to predict")
    images = torch.stack([load_image(p, config.image_size) for p in files])
    scores, maps = predict(model, images, device=dev, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in files]
    # Same stem in two folders (MVTec's 000.png in every defect folder): prefix every name
    # with its folder, so the outputs of one call are named alike.
    clash = len(set(stems)) < len(stems)
    names = [f"{p.parent.name}_{p.stem}" if clash else p.stem for p in files]
    results = []
    for p, stem, img, score, amap in zip(files, names, images, scores, maps, strict=True):
        blended = Image.fromarray(overlay(img.permute(1, 2, 0).numpy().astype(float), amap))
        ckpt.atomic_write(out / f"{stem}_overlay.png", lambda fh, im=blended: im.save(fh, format="PNG"))
        if save_maps:
            ckpt.atomic_write(out / f"{stem}_map.npy", lambda fh, a=amap: np.save(fh, a))
        results.append({"image": str(p), "score": float(score), "anomalous": bool(score >= threshold),
                        "threshold": float(threshold), "overlay": str(out / f"{stem}_overlay.png")})
    return results


def export(checkpoint: str | Path, fmt: str, out: str | Path, *, check: bool = True) -> dict[str, float]:
    """Export to ONNX or TorchScript (input (B, 3, S, S) in [0, 1]; outputs anomaly_map
    (B, 1, S, S) and score (B,)); then run both on a random input and return the largest
    absolute difference of the anomaly maps."""
    model, config, _ = ckpt.load_model(checkpoint, "cpu")
    wrapper = ExportWrapper(model).eval()
    s = config.image_size
    x = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    if fmt == "torchscript":
        with torch.inference_mode():
            traced = torch.jit.trace(wrapper, x[:1], check_trace=False)
        ckpt.atomic_write(out, lambda fh: torch.jit.save(traced, fh))
        exported = torch.jit.load(str(out))
        run = lambda t: exported(t)[0].detach().numpy()  # noqa: E731
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
        run = lambda t: session.run(["anomaly_map"], {"image": t.numpy()})[0]  # noqa: E731
    else:
        raise ConfigError(f"unknown export format '{fmt}': choose onnx or torchscript")
    with torch.inference_mode():
        reference = wrapper(x)[0].numpy()
    diff = float(np.abs(run(x) - reference).max()) if check else float("nan")
    return {"max_abs_diff": diff}
