"""``pouta bench``: model, train, synthesis, metrics, orchestration, scale and serving figures."""

from __future__ import annotations

import argparse
import contextlib
import sys

from orchestrator.cli.args import add_config_args, load_config
from orchestrator.cli.console import print_json
from pouta_core.config import Config, ConfigError

# CPUs of one GPU worker in cluster/ray-cluster.yaml (g5.2xlarge: 8 vCPUs) and the KubeRay
# manifests (cpu: "8"); a test reads them.
SHIPPED_CPUS_PER_GPU_WORKER = 8
# The paper preset's estimated training rate on one H100 (issue 50: ~1 ms per image, bf16, 224 px).
H100_PAPER_SAMPLES_PER_S = 400.0


def print_targets(targets: dict[str, bool]) -> None:
    print(", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in targets.items()))


def _bench_config(args: argparse.Namespace) -> Config:
    """The config a model or train benchmark measures (``--image-size`` over the preset), on a
    device that exists."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    return load_config(args, [f"image_size={args.image_size}"] if args.image_size else [])


def _cmd_bench_model(args: argparse.Namespace) -> int:
    from pouta_core.benchmark import bench_models, format_table

    cfg = _bench_config(args)
    result = bench_models(cfg, device=args.device, runs=args.runs, warmup=args.warmup,
                          progress=not args.json)
    if args.json:
        print_json(result)
    else:
        print(format_table(result, device=args.device, image_size=cfg.image_size, runs=args.runs))
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from pouta_core.benchmark import bench_train, cpus_needed

    if args.steps < 1 or args.num_workers < 0:
        raise ConfigError("--steps must be >= 1 and --num-workers >= 0")
    r = bench_train(_bench_config(args), device=args.device, steps=args.steps, num_workers=args.num_workers,
                    progress=not args.json)
    if args.json:
        print_json(r)
        return 0
    print(f"{r['device']}, {r['image_size']} px, batch {r['batch_size']}, {r['num_workers']} loader workers: "
          f"input {r['input_samples_per_s']:.1f} samples/s, model step {r['model_step_samples_per_s']:.1f}, "
          f"whole step {r['train_step_samples_per_s']:.1f}; input/model x{r['input_to_model_ratio']:.1f}, "
          f"waiting for input {r['waiting_for_input_share']:.0%} of the step")
    per_cpu = r["input_samples_per_s_per_cpu"]
    need = cpus_needed(per_cpu, args.target_rate)
    where = (f"{per_cpu:.1f} samples/s per input CPU ({r['input_cpus']})" if per_cpu
             else "the input costs no CPU (made on the device)")
    print(f"{where}: {args.target_rate:g} samples/s needs {need} CPUs per GPU worker (the model's process "
          f"included); the manifests give {SHIPPED_CPUS_PER_GPU_WORKER}: "
          f"{'covered' if need <= SHIPPED_CPUS_PER_GPU_WORKER else 'SHORT'}")
    print_targets(r["targets"])
    return 0


def _cmd_bench_synthesis(args: argparse.Namespace) -> int:
    from orchestrator.commands.peers import anomalib_rate
    from pouta_core.benchmark import bench_synthesis
    from pouta_core.synthesis import TextureFolder

    if args.samples < 1 or args.rounds < 1 or args.batch_size < 1:
        raise ConfigError("--samples, --rounds and --batch-size must be >= 1")
    cfg = Config.from_preset("paper", [f"image_size={args.image_size}", f"clean_ratio={args.clean_ratio}"])
    textures = TextureFolder(args.texture_dir, args.image_size) if args.texture_dir else None
    if args.profile:
        return _profile_synthesis(cfg, textures, args)
    peer = anomalib_rate(args.anomalib_python, image_size=args.image_size, samples=args.samples,
                         batch_size=args.batch_size, texture_dir=args.texture_dir,
                         clean_ratio=args.clean_ratio) if args.compare_anomalib else None
    r = bench_synthesis(cfg, n=args.samples, batch_size=args.batch_size, textures=textures, rounds=args.rounds,
                        peer=peer, progress=not args.json)
    if args.json:
        print_json(r)
        return 0
    source = f"textures from {args.texture_dir}" if textures is not None else "procedural sources"
    print(f"synthesis at {r['image_size']} px, {source}, clean_ratio {r['clean_ratio']}, one core, medians of "
          f"{r['rounds']} round(s): batched {r['batched_images_per_s_per_core']:.1f} images/s, per-sample "
          f"{r['per_sample_images_per_s_per_core']:.1f} (x{r['batched_to_per_sample']:.1f})")
    if peer is not None:
        print(f"anomalib PerlinAnomalyGenerator {r['anomalib_images_per_s_per_core']:.1f} images/s: batched is "
              f"x{r['batched_to_anomalib']:.1f} ({'ok' if r['targets']['batched>=3x anomalib'] else 'MISSED'}: "
              "target x3)")
    return 0


def _profile_synthesis(cfg: Config, textures, args: argparse.Namespace) -> int:
    from pouta_core.benchmark import synthesis_ops

    sizes = tuple(sorted({args.batch_size, 4 * args.batch_size}))
    r = synthesis_ops(cfg, batch_sizes=sizes, textures=textures)
    device = [r[f"batch_{b}"]["device_ops"] for b in sizes]
    # Independent of the batch size; a small batch that draws no sharpening, say, skips its ops.
    r["targets"] = {"device_ops<=150": max(device) <= 150,
                    "device_syncs==0": all(r[f"batch_{b}"]["device_syncs"] == 0 for b in sizes)}
    if args.json:
        print_json(r)
        return 0
    source = f"textures from {args.texture_dir}" if textures is not None else "procedural sources"
    print(f"batched synthesis at {r['image_size']} px, {source}, clean_ratio {r['clean_ratio']}: top-level aten ops "
          "per batch (torch.profiler)")
    for b in sizes:
        x = r[f"batch_{b}"]
        print(f"  batch {b:3}: device {x['device_ops']} (of which views {x['device_views']}, reads on the host "
              f"{x['device_syncs']}), host draws {x['host_ops']}")
    print("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in r["targets"].items()))
    return 0


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from orchestrator.commands.scale import bench_scale

    for flag in ("categories", "trials", "nodes", "gpus_per_node", "epochs"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.epoch_floor_s <= 0 or args.timeout_s <= 0:
        raise ConfigError("--epoch-floor-s and --timeout-s must be > 0")
    r = bench_scale(args.categories, args.trials, args.nodes, args.gpus_per_node, args.epochs, args.epoch_floor_s,
                    args.work, args.timeout_s, args.code)
    if args.json:
        print_json(r)
        return 0
    print(f"{r['categories']} categories x {r['trials_per_category']} trials on {r['nodes']} Ray nodes, "
          f"{r['slots']} simulated GPUs: {r['trials_finished']} finished, {r['trials_errored']} errored; trials' "
          f"wall {r['wall_s']:.0f} s = x{r['wall_to_ideal']:.2f} the ideal {r['ideal_s']:.0f} s (job "
          f"{r['job_wall_s']:.0f} s); driver CPU per trial {r['driver_cpu_s_per_trial_first_10pct']:.2f} s (first "
          f"10%) -> {r['driver_cpu_s_per_trial_last_10pct']:.2f} s (last 10%), RSS "
          f"{r['driver_rss_mb_first_10pct']:.0f} -> {r['driver_rss_mb_last_trial']:.0f} MB (peak "
          f"{r['driver_peak_rss_mb']:.0f}); MLflow {r['mlflow_requests_per_trial']:.0f} requests and "
          f"{r['mlflow_artifact_mb_per_trial_max']:.2f} MB (max) per trial; Optuna storage "
          f"{r['optuna_storage_kb']:.0f} kB")
    print_targets(r["targets"])
    return 0


def _cmd_bench_metrics(args: argparse.Namespace) -> int:
    from pouta_core.benchmark import bench_metrics

    result = bench_metrics(args.pixels)
    if args.json:
        print_json(result)
    else:
        print(f"{result['pixels']:,} pixels: pouta_core.metrics {result['pouta_seconds']:.2f} s, "
              f"scikit-learn {result['sklearn_seconds']:.2f} s (x{result['speedup']:.1f}); "
              f"largest |difference| {result['max_abs_diff']:.2e}")
        print(f"an evaluation's six metrics on them as maps: {result['evaluation_seconds']:.2f} s, "
              f"the four pixel metrics one by one {result['one_by_one_seconds']:.2f} s "
              f"(x{result['evaluation_speedup']:.1f})")
    return 0


def _cmd_bench_orchestration(args: argparse.Namespace) -> int:
    from orchestrator.commands.bench import bench_orchestration

    if args.trials < 1 or args.slots < 1:
        raise ConfigError("--trials and --slots must be >= 1")
    if args.epoch_floor_s < 0:
        raise ConfigError(f"--epoch-floor-s must be >= 0, got {args.epoch_floor_s}")
    # With --json, stdout is the figures only: Tune's progress tables go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = bench_orchestration(args.categories, args.trials, args.slots, args.work, args.epoch_floor_s)
    if args.json:
        print_json(result)
    else:
        r = result
        print(f"{args.categories} categories x {args.trials} trials, {args.slots} slots, epochs of at least "
              f"{args.epoch_floor_s:g} s (simulated accelerator): concurrent "
              f"{r['concurrent_wall_s']:.0f} s, serial {r['serial_wall_s']:.0f} s (x{r['wall_ratio']:.2f}); "
              f"training {result['training_share_of_slot_time']:.0%} of slot time; per-trial overhead "
              f"{result['trial_overhead_s_median']:.1f} s (start {result['trial_startup_overhead_s_median']:.1f}, "
              f"end {result['trial_teardown_overhead_s_median']:.1f})")
        print_targets(result["targets"])
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from orchestrator.commands.serve_bench import bench_serve

    if args.images < 16 or args.rounds < 1:
        raise ConfigError("--images must be >= 16 and --rounds >= 1")
    r = bench_serve(model=args.model, tracking_uri=args.tracking_uri, images=args.images,
                    image_size=args.image_size, rounds=args.rounds, progress=not args.json)
    if args.json:
        print_json(r)
        return 0
    rates, kb = r["images_per_s"], r["response_kb_per_image"]
    print(f"{r['images']} images of {r['image_size']} px, {r['model']}, median of {r['rounds']} rounds (images/s):")
    for key, value in rates.items():
        print(f"  {key:26} {value:8.1f}")
    print(f"HTTP / in-process: batch 1 x{r['http_to_in_process'][1]}, batch 16 x{r['http_to_in_process'][16]}; "
          f"HTTP overhead per request: batch 1 {r['http_overhead_ms_per_request'][1]} ms, "
          f"batch 16 {r['http_overhead_ms_per_request'][16]} ms; response per image "
          f"{kb['no_map']} kB without map, {kb['map_at_input_size']} kB "
          "with the map at the input's size")
    return 0


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bm = bench_sub.add_parser("model", help="POUTA vs vanilla: parameters, GFLOPs, latency")
    add_config_args(bm)
    bm.add_argument("--image-size", type=int, default=None, help="override image_size")
    bm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bm.add_argument("--runs", type=int, default=20, help="timed runs per model (>= 20)")
    bm.add_argument("--warmup", type=int, default=3, help="untimed runs per model first")
    bm.add_argument("--json", action="store_true", help="print one JSON object")
    bm.set_defaults(func=_cmd_bench_model)
    bt = bench_sub.add_parser("train", help="training throughput: input pipeline, model step, whole step, "
                              "share of the step spent waiting for input")
    add_config_args(bt)
    bt.add_argument("--image-size", type=int, default=None, help="override image_size")
    bt.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bt.add_argument("--steps", type=int, default=5, help="timed batches per measurement (default 5)")
    bt.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    bt.add_argument("--target-rate", type=float, default=H100_PAPER_SAMPLES_PER_S,
                    help="input samples/s a GPU worker must be fed: the CPUs it needs at the measured rate per "
                    f"input CPU (default {H100_PAPER_SAMPLES_PER_S:g}, the paper preset's estimated H100 rate)")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=_cmd_bench_train)
    bs = bench_sub.add_parser("synthesis", help="synthesised images per second per core")
    bs.add_argument("--image-size", type=int, default=224)
    bs.add_argument("--samples", type=int, default=64, help="images per measurement (default 64)")
    bs.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    bs.add_argument("--clean-ratio", type=float, default=0.0,
                    help="share of images left clean, for both generators (default 0: every image gets an anomaly)")
    bs.add_argument("--texture-dir", help="anomaly source images (DTD or any folder); default: procedural sources "
                    "(anomalib: its Perlin noise)")
    bs.add_argument("--rounds", type=int, default=3, help="measurements in turns; medians are printed (default 3)")
    bs.add_argument("--compare-anomalib", action="store_true",
                    help="also time anomalib's PerlinAnomalyGenerator, in its own environment "
                    "(make bench-anomalib-env)")
    bs.add_argument("--anomalib-python", default=".venv-anomalib/bin/python",
                    help="the Python of that environment (default .venv-anomalib/bin/python)")
    bs.add_argument("--profile", action="store_true",
                    help="count the batched path's ops per batch at --batch-size and 4 times it (torch.profiler) "
                    "instead of timing: what a GPU step would launch, and its reads on the host")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=_cmd_bench_synthesis)
    bo = bench_sub.add_parser("orchestration", help="concurrent vs one-category-after-another sweeps, "
                              "per-trial overhead, on an in-process Ray with more logical CPUs than cores")
    bo.add_argument("--categories", type=int, default=4, choices=range(1, 5), metavar="K", help="1 to 4 (default 4)")
    bo.add_argument("--trials", type=int, default=4, help="trials per category (default 4)")
    bo.add_argument("--slots", type=int, default=8, help="logical CPUs = concurrent trials (default 8)")
    bo.add_argument("--epoch-floor-s", type=float, default=3.0,
                    help="simulated accelerator: each epoch lasts at least this long, waiting rather "
                         "than computing (default 3; 0 = purely CPU-bound trials sharing this machine's cores)")
    bo.add_argument("--work", help="folder for data, Ray results and MLflow (default: a new temp folder)")
    bo.add_argument("--json", action="store_true")
    bo.set_defaults(func=_cmd_bench_orchestration)
    bc = bench_sub.add_parser("scale", help="an MVTec-sized sweep rehearsed here: a multi-node Ray on 127.0.0.1, a "
                              "real mlflow server, ray job submit; driver overhead, MLflow requests and bytes per "
                              "trial, wall time against the ideal schedule")
    bc.add_argument("--categories", type=int, default=15, help="categories (default 15, MVTec's)")
    bc.add_argument("--trials", type=int, default=64, help="Optuna trials per category (default 64)")
    bc.add_argument("--nodes", type=int, default=3, help="worker nodes besides the head (default 3)")
    bc.add_argument("--gpus-per-node", type=int, default=2, help="simulated GPUs (and CPUs) per worker node "
                    "(default 2); one trial per GPU")
    bc.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    bc.add_argument("--epoch-floor-s", type=float, default=3.0,
                    help="simulated accelerator: each epoch lasts at least this long (default 3)")
    bc.add_argument("--timeout-s", type=float, default=7200, help="stop the sweep job after this long (default 7200)")
    bc.add_argument("--work", help="folder for data, Ray results, MLflow and logs (default: a new temp folder)")
    bc.add_argument("--code", help="run the sweep from this checkout of the project (an older version, for a "
                    "before/after comparison); default: this one")
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(func=_cmd_bench_scale)
    bv = bench_sub.add_parser("serve", help="images/s through pouta serve's HTTP path vs the same scoring "
                              "in-process and pouta predict, side by side")
    bv.add_argument("--model", help="the model to serve (as pouta serve --model; default: a tiny one trained here)")
    bv.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/")
    bv.add_argument("--images", type=int, default=64, help="images scored per path and round (default 64)")
    bv.add_argument("--image-size", type=int, default=256, help="side of the generated images (default 256)")
    bv.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    bv.add_argument("--json", action="store_true")
    bv.set_defaults(func=_cmd_bench_serve)

    bx = bench_sub.add_parser("metrics", help="metrics vs scikit-learn: seconds and difference")
    bx.add_argument("--pixels", type=int, default=10_000_000)
    bx.add_argument("--json", action="store_true")
    bx.set_defaults(func=_cmd_bench_metrics)
