"""Side-by-side cost of POUTA and the vanilla baseline (paper Table 5).

Both models are built in one process from the same config, differing only in ``variant``,
and timed alternately so that machine noise hits both alike; report ratios, not seconds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from pouta_core.config import Config
from pouta_core.model import build_model

FLOPS_NOTE = (
    "GFLOPs: torch.utils.flop_counter.FlopCounterMode at batch 1, convolutions and matrix "
    "products only, 2 FLOPs per multiply-add; BN, activations, pooling and resizing not counted"
)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def latency_ms(model: nn.Module, x: torch.Tensor, *, runs: int = 10, warmup: int = 2) -> float:
    """Median time in ms of ``runs`` forwards of ``x`` under ``torch.inference_mode()``,
    after ``warmup`` untimed ones (CUDA synchronised around each)."""
    now = _timer(x.device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = now()
            model(x)
            if i >= warmup:
                times.append(now() - start)
    return statistics.median(times) * 1e3


def bench_models(
    config: Config,
    *,
    device: str = "cpu",
    runs: int = 20,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """-> {"pouta": {...}, "vanilla": {...}, "ratio": {...}} with params_m, gflops, latency_ms.

    Latency is the median of ``runs`` batch-1 forwards under ``torch.inference_mode()`` in
    eval mode, after ``warmup`` untimed forwards, the two models alternated run by run.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    models = {
        name: build_model(config, variant=name).to(dev).eval() for name in ("pouta", "vanilla")
    }
    x = torch.rand(1, 3, config.image_size, config.image_size, device=dev)
    out: dict[str, dict[str, float]] = {
        name: {"params_m": count_params(m) / 1e6, "gflops": count_flops(m, x) / 1e9}
        for name, m in models.items()
    }
    now = _timer(dev)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in tqdm(range(runs), desc="timing pouta/vanilla", disable=not progress, leave=False):
            for name, m in models.items():
                start = now()
                m(x)
                times[name].append(now() - start)
    for name in models:
        out[name]["latency_ms"] = statistics.median(times[name]) * 1e3
    out["ratio"] = {k: out["pouta"][k] / out["vanilla"][k] for k in ("params_m", "gflops", "latency_ms")}
    return out


def format_table(result: dict[str, dict[str, float]], *, device: str, image_size: int, runs: int) -> str:
    rows = [f"model benchmark: {image_size}x{image_size}, batch 1, device {device}, median of {runs} runs",
            f"{'':10}{'params (M)':>12}{'GFLOPs':>10}{'latency (ms)':>14}"]
    for name in ("pouta", "vanilla", "ratio"):
        r = result[name]
        fmt = "{:>12.3f}{:>10.3f}{:>14.3f}" if name == "ratio" else "{:>12.2f}{:>10.2f}{:>14.1f}"
        label = "pouta/van." if name == "ratio" else name
        rows.append(f"{label:10}" + fmt.format(r["params_m"], r["gflops"], r["latency_ms"]))
    rows.append(FLOPS_NOTE)
    return "\n".join(rows)


def _one_thread(fn):
    """Run ``fn`` with one intra-op thread: figures per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def synthesis_rate(config: Config, *, path: str, n: int, batch_size: int = 8, textures=None,
                   progress: bool = False) -> float:
    """Training images synthesised per second on one core by one path, ``batched``
    (:class:`~pouta_core.synthesis.batched.BatchSynthesizer`, batches of ``batch_size``) or
    ``per_sample`` (:class:`~pouta_core.synthesis.AnomalySynthesizer`), on random images of
    ``config.image_size``, with the config's ``clean_ratio`` (the paper's 0.5: half the
    images stay clean, as in training). One warm-up batch is not timed."""
    from pouta_core.synthesis import AnomalySynthesizer
    from pouta_core.synthesis.batched import BatchSynthesizer

    g = torch.Generator().manual_seed(config.seed)
    images = torch.rand(batch_size, 3, config.image_size, config.image_size, generator=g)
    if path == "batched":
        synth = BatchSynthesizer(config, textures.bank() if textures is not None else None)
        step = lambda: synth(images, g)   # noqa: E731
    else:
        one = AnomalySynthesizer(config, textures)
        step = lambda: [one(image, g) for image in images]   # noqa: E731
    batches = max(1, n // batch_size)

    def run() -> float:
        step()
        start = time.perf_counter()
        for _ in tqdm(range(batches), desc=f"synthesis ({path})", disable=not progress, leave=False):
            step()
        return batches * batch_size / (time.perf_counter() - start)

    return _one_thread(run)


def bench_synthesis(config: Config, *, n: int = 64, batch_size: int = 8, textures=None, rounds: int = 1,
                    peer=None, progress: bool = True) -> dict[str, Any]:
    """Images per second per core of both synthesis paths and, with ``peer`` (a function
    returning a rate, e.g. anomalib's generator in its own environment), of the peer,
    measured in turns ``rounds`` times (medians: this machine is shared and noisy)."""
    rates: dict[str, list[float]] = {"batched": [], "per_sample": []}
    if peer is not None:
        rates["peer"] = []
    for _ in range(rounds):
        for path in ("batched", "per_sample"):
            rates[path].append(synthesis_rate(config, path=path, n=n, batch_size=batch_size, textures=textures,
                                              progress=progress))
        if peer is not None:
            rates["peer"].append(peer())
    median = {k: statistics.median(v) for k, v in rates.items()}
    result: dict[str, Any] = {"image_size": config.image_size, "batch_size": batch_size,
                              "clean_ratio": config.clean_ratio, "textures": textures is not None, "rounds": rounds,
                              "batched_images_per_s_per_core": median["batched"],
                              "per_sample_images_per_s_per_core": median["per_sample"],
                              "batched_to_per_sample": median["batched"] / median["per_sample"]}
    if peer is not None:
        result["anomalib_images_per_s_per_core"] = median["peer"]
        result["batched_to_anomalib"] = median["batched"] / median["peer"]
        result["targets"] = {"batched>=3x anomalib": result["batched_to_anomalib"] >= 3}
    return result


# Ops that read a device tensor on the host: each one makes the host wait for the device.
SYNC_OPS = frozenset({"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"})


def top_level_ops(fn: Callable[[], Any], *, skip: str | None = None) -> Counter:
    """The aten ops ``fn`` issues, by name, counting only top-level ones (an op called by
    another op is its caller's): what the host dispatches, one by one, and on a GPU about
    the kernels it launches (views launch none). ``skip``: leave out the ops inside a
    ``record_function`` scope of that name (e.g. the synthesis's draws on CPU tensors)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, skipped = event.cpu_parent, False
        while parent is not None and not parent.name.startswith("aten::"):
            skipped = skipped or parent.name == skip
            parent = parent.cpu_parent
        if parent is None and not skipped:
            counts[event.name] += 1
    return counts


VIEW_OPS = frozenset({"aten::view", "aten::slice", "aten::select", "aten::unsqueeze", "aten::unbind", "aten::split",
                      "aten::split_with_sizes", "aten::chunk", "aten::transpose", "aten::expand", "aten::flatten",
                      "aten::reshape"})


def synthesis_ops(config: Config, *, batch_sizes: tuple[int, ...] = (8, 32), textures=None) -> dict[str, Any]:
    """Ops per batch of the batched synthesis (:class:`~pouta_core.synthesis.batched.BatchSynthesizer`)
    at each batch size, on random images of ``config.image_size``: those of
    :meth:`~pouta_core.synthesis.batched.BatchSynthesizer.draw` (CPU tensors: the host's
    draws) and of :meth:`~pouta_core.synthesis.batched.BatchSynthesizer.apply` (on the
    batch's device: on a GPU, its launches), views among them, and the device's ops that read
    a tensor back on the host (each one a sync on a GPU). Measured on the CPU, where the
    device ops are the same ones; on CUDA, ``apply`` adds the pinned copy of the draws."""
    from pouta_core.synthesis.batched import BatchSynthesizer

    bank = textures.bank() if textures is not None else None
    synth = BatchSynthesizer(config, bank)
    size = config.image_size
    result: dict[str, Any] = {"image_size": size, "clean_ratio": config.clean_ratio, "textures": bank is not None}
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(config.seed)
        images = torch.rand(batch, 3, size, size, generator=g)
        for _ in range(3):   # first: the constants cached per device and size
            synth(images, g)
        plans = []
        host = top_level_ops(lambda: plans.append(synth.draw(batch, size, size, g)))   # noqa: B023
        device = top_level_ops(lambda: synth.apply(images, plans[0]))   # noqa: B023
        result[f"batch_{batch}"] = {
            "host_ops": sum(host.values()), "device_ops": sum(device.values()),
            "device_views": sum(v for k, v in device.items() if k in VIEW_OPS),
            "device_syncs": sum(v for k, v in device.items() if k in SYNC_OPS)}
    return result


def bench_metrics(pixels: int = 10_000_000, *, seed: int = 0) -> dict[str, float]:
    """pouta_core.metrics against scikit-learn on the same random pixels (scores rounded to
    3 decimals, so there are many ties): seconds each and the largest absolute difference. Then
    an evaluation's pixel metrics on those pixels as 256 x 256 maps: :func:`~pouta_core.metrics.compute`
    (the pixels sorted once) against the four metrics called one by one (each sorting them), side by side."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pouta_core import metrics

    rng = np.random.default_rng(seed)
    labels = rng.random(pixels) < 0.02
    scores = np.round(np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0, 1), 3).astype(np.float32)
    t0 = time.perf_counter()
    ours = (metrics.auroc(scores, labels), metrics.average_precision(scores, labels))
    t1 = time.perf_counter()
    ref = (roc_auc_score(labels, scores), average_precision_score(labels, scores))
    t2 = time.perf_counter()
    diff = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
    side = 256
    maps = scores[:pixels // side**2 * side**2].reshape(-1, side, side)
    masks = labels[:maps.size].reshape(maps.shape).astype(np.uint8)
    image_scores, image_labels = maps.max((1, 2)), masks.any((1, 2)).astype(int)
    t3 = time.perf_counter()
    metrics.compute(image_scores, image_labels, maps, masks)
    t4 = time.perf_counter()
    (metrics.auroc(maps, masks), metrics.average_precision(maps, masks), metrics.aupro(maps, masks),
     metrics.f1_max(maps, masks))
    t5 = time.perf_counter()
    return {"pixels": pixels, "pouta_seconds": t1 - t0, "sklearn_seconds": t2 - t1,
            "speedup": (t2 - t1) / (t1 - t0), "max_abs_diff": float(diff), "auroc": ours[0], "ap": ours[1],
            "evaluation_seconds": t4 - t3, "one_by_one_seconds": t5 - t4, "evaluation_speedup": (t5 - t4) / (t4 - t3)}


def bench_train(config: Config, *, device: str = "cpu", steps: int = 5, warmup: int = 1, num_workers: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Samples per second of the training input pipeline alone (the loader of
    :func:`~pouta_core.training.make_loader`: batched synthesis on ``device``, or per-sample
    synthesis in ``num_workers`` DataLoader workers, as ``config.synthesis`` says), of the
    model step alone (forward, loss, backward and Adam on one pre-made batch on ``device``),
    and of the whole training step (the two together, as ``train_epoch`` runs them), with the
    share of the whole step's time spent waiting for the next batch. Random images of
    ``config.image_size``."""
    from pouta_core.training import autocast_dtype, make_loader, new_state, train_step, training_net

    dev = torch.device(device)
    b, s = config.batch_size, config.image_size
    g = torch.Generator().manual_seed(config.seed)
    images = torch.randint(0, 256, ((warmup + steps) * b, 3, s, s), generator=g, dtype=torch.uint8)

    def batches():
        loader = make_loader(images, config, textures=None, batch_size=b, shard=(0, 1), num_workers=num_workers,
                             device=dev)
        loader.sampler.set_epoch(1)
        return iter(loader)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    state = new_state(config, dev)
    state.model.train()
    net = training_net(state, config)
    batch = next(batches())
    bar = tqdm(total=3 * (warmup + steps), desc="bench train", disable=not progress, leave=False)
    timings = {
        "input": _timed_loop(batches(), lambda item: sync(), warmup, steps, bar),
        "model": _timed_loop(iter(lambda: batch, None),
                             lambda item: (train_step(state, net, item, config, dev), sync()), warmup, steps,
                             bar),
        "whole": _timed_loop(batches(), lambda item: (train_step(state, net, item, config, dev), sync()),
                             warmup, steps, bar),
    }
    bar.close()
    n = steps * b
    whole_s, waited = timings["whole"]
    amp = autocast_dtype(config, dev)
    result = {"device": str(dev), "image_size": s, "batch_size": b, "steps": steps, "synthesis": config.synthesis,
              **{k: getattr(config, k) for k in ("channels_last", "compile")},
              "autocast": None if amp is None else str(amp).removeprefix("torch."),
              "num_workers": num_workers if config.synthesis == "per_sample" else 0,
              "input_samples_per_s": n / timings["input"][0], "model_step_samples_per_s": n / timings["model"][0],
              "train_step_samples_per_s": n / whole_s, "waiting_for_input_share": waited / whole_s}
    result["input_to_model_ratio"] = result["input_samples_per_s"] / result["model_step_samples_per_s"]
    # The CPUs that made the input: the loader workers (one thread each), or this process's
    # threads when it synthesises itself on the CPU; none on a GPU (batched synthesis there).
    if config.synthesis == "per_sample":
        cpus = num_workers or torch.get_num_threads()
    else:
        cpus = torch.get_num_threads() if dev.type == "cpu" else 0
    result["input_cpus"] = cpus
    result["input_samples_per_s_per_cpu"] = result["input_samples_per_s"] / cpus if cpus else None
    result["targets"] = {"input>=5x model step": result["input_to_model_ratio"] >= 5,
                         "waiting<10%": result["waiting_for_input_share"] < 0.10}
    return result


def _timed_loop(items, work, warmup: int, steps: int, bar) -> tuple[float, float]:
    """Take ``warmup + steps`` items and ``work`` on each; -> (seconds of the last ``steps``,
    of which seconds spent waiting for the next item)."""
    waited, start = 0.0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start, waited = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        item = next(items)
        waited += time.perf_counter() - t0
        work(item)
        bar.update()
    return time.perf_counter() - start, waited


def cpus_needed(per_cpu_rate: float | None, rate: float) -> int:
    """CPUs a training worker needs to make ``rate`` input samples/s at ``per_cpu_rate`` per CPU:
    the input's CPUs plus the one that steps the model (1 when the input costs no CPU)."""
    return 1 if not per_cpu_rate else 1 + math.ceil(rate / per_cpu_rate)
