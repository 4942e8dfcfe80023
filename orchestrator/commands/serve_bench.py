"""``pouta bench serve``: images per second through ``pouta serve``'s HTTP path against the same
scoring in-process, side by side on the same images (issue 32).

Without ``--model`` a tiny model is trained for a few seconds on generated demo data (its
speed, not its quality, is measured). Each round measures, one after the other: the scorer
in-process at batch 1 and 16 (:class:`pouta_core.serving.ImageScorer`, what the server runs),
HTTP at batch 1 and 16 without maps, HTTP at batch 16 with maps at the input's size, and
``pouta predict``'s function (which also writes an overlay per image). Medians over rounds;
the HTTP overhead is reported per request and as a ratio to in-process.
"""

from __future__ import annotations

import base64
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _post(url: str, images: list[str], params: dict[str, Any]) -> int:
    body = json.dumps({"inputs": {"image": images}, "params": params}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        payload = r.read()
    answers = json.loads(payload)["predictions"]
    if len(answers) != len(images) or any(a["error"] for a in answers):
        raise RuntimeError(f"the server answered {len(answers)} of {len(images)} images, or with errors")
    return len(payload)


def _rate(fn, images: list[str], batch: int) -> tuple[float, int]:
    """(images per second, response bytes) of ``fn`` over ``images`` in chunks of ``batch``."""
    start, sent = time.perf_counter(), 0
    for i in range(0, len(images), batch):
        sent += fn(images[i:i + batch]) or 0
    return len(images) / (time.perf_counter() - start), sent


def _images_and_model(root: Path, image_size: int, count: int, train: bool) -> tuple[Path, list[Path]]:
    """Generated demo images to score, and (with ``train``) a tiny model trained one epoch on
    them -> (its run folder, the image files)."""
    from pouta_core import api
    from pouta_core.config import Config
    from pouta_core.data.demo import generate

    generate(root / "data", categories=1, image_size=image_size, n_train=8, n_test_good=count // 2,
             n_test_defect=max(1, count // 6))
    if train:   # --model names the model to serve: nothing to train
        config = Config.from_preset("tiny", ["epochs=1", "eval_every=1", "checkpoint_every=1", "lr_milestones=[]"])
        api.train(config, data_root=root / "data", dataset="mvtec", category="tiles", out=root / "run", device="cpu",
                  progress=False)
    return root / "run", sorted((root / "data" / "tiles" / "test").glob("*/*.png"))[:count]


def bench_serve(*, model: str | None, tracking_uri: str | None, images: int, image_size: int, rounds: int,
                progress: bool = True) -> dict[str, Any]:
    from orchestrator.commands.serve import model_server, save_served_model
    from orchestrator.execution.cluster import free_port
    from orchestrator.tracking.models import resolved
    from pouta_core import api
    from pouta_core.serving import ImageScorer

    with tempfile.TemporaryDirectory(prefix="pouta-bench-serve-") as tmp:
        root = Path(tmp)
        run, files = _images_and_model(root, image_size, images, train=model is None)
        ref = model or str(run)
        with resolved(ref, tracking_uri) as checkpoint:
            folder = save_served_model(checkpoint, root / "served")
            scorer = ImageScorer(checkpoint, "cpu")
            encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
            no_map = {"map_size": 0}
            with (root / "server.log").open("w") as log, model_server(folder, port=free_port(), log=log) as (_, url):
                paths = {
                    "in_process_batch_1": lambda: _rate(lambda b: scorer.score(b, map_size=0) and 0, encoded, 1),
                    "in_process_batch_16": lambda: _rate(lambda b: scorer.score(b, map_size=0) and 0, encoded, 16),
                    "http_batch_1": lambda: _rate(lambda b: _post(url, b, no_map), encoded, 1),
                    "http_batch_16": lambda: _rate(lambda b: _post(url, b, no_map), encoded, 16),
                    "http_batch_16_with_maps": lambda: _rate(lambda b: _post(url, b, {}), encoded, 16),
                    "pouta_predict_batch_16": lambda: (len(files) / _timed(
                        lambda: api.predict_paths(checkpoint, files, root / "predicted", device="cpu")), 0),
                }
                for fn in paths.values():   # warm-up: first requests, first model calls
                    fn()
                measured: dict[str, list[tuple[float, int]]] = {k: [] for k in paths}
                for _ in tqdm(range(rounds), desc="rounds", disable=not progress):
                    for key, fn in paths.items():
                        measured[key].append(fn())
    rate = {k: statistics.median(r for r, _ in v) for k, v in measured.items()}
    result: dict[str, Any] = {"images": len(files), "image_size": image_size, "rounds": rounds,
                              "model": model or "tiny preset, trained 1 epoch here",
                              "images_per_s": {k: round(v, 1) for k, v in rate.items()}}
    result["http_to_in_process"] = {b: round(rate[f"http_batch_{b}"] / rate[f"in_process_batch_{b}"], 2)
                                    for b in (1, 16)}
    result["http_overhead_ms_per_request"] = {
        b: round(1000 * b * (1 / rate[f"http_batch_{b}"] - 1 / rate[f"in_process_batch_{b}"]), 1) for b in (1, 16)}
    result["response_kb_per_image"] = {
        "no_map": round(measured["http_batch_16"][0][1] / len(files) / 1024, 2),
        "map_at_input_size": round(measured["http_batch_16_with_maps"][0][1] / len(files) / 1024, 1)}
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
