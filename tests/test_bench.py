import json
import subprocess
import sys

from pouta_core.benchmark import bench_models
from pouta_core.config import Config

KEYS = {"params_m", "gflops", "latency_ms"}


def test_bench_model_json_schema_from_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "model", "--preset", "tiny",
         "--image-size", "32", "--json", "--set", "rec_width=4", "--set", "disc_width=4",
         "--set", "fcm_width=4"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert set(result) == {"pouta", "vanilla", "ratio"}
    for name in result:
        assert set(result[name]) == KEYS
        assert all(isinstance(v, float) and v > 0 for v in result[name].values())
    for key in KEYS:
        assert abs(result["ratio"][key] - result["pouta"][key] / result["vanilla"][key]) < 1e-9


def test_bench_counts_fewer_params_and_flops_for_pouta():
    cfg = Config.from_preset("tiny", ["image_size=32"])
    result = bench_models(cfg, runs=2, warmup=0, progress=False)
    assert result["ratio"]["params_m"] < 1 and result["ratio"]["gflops"] < 1


def test_bench_cli_rejects_fewer_than_20_runs():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "bench", "model", "--runs", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--runs must be at least 20" in out.stderr


def test_bench_cli_reports_bad_config_key_in_one_line():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "bench", "model", "--preset", "tiny",
                          "--set", "rec_widht=8"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("pouta: error: --set rec_widht=8: unknown config key 'rec_widht' "
                                  "(did you mean 'rec_width'?)")


def test_latency_ms_times_only_the_runs_after_warmup():
    import time

    import torch

    from pouta_core.benchmark import latency_ms

    calls = []

    class Slow(torch.nn.Module):
        def forward(self, x):
            calls.append(torch.is_inference_mode_enabled())
            time.sleep(0.02 if len(calls) > 2 else 0.3)   # slow warm-up runs are not timed
            return x

    ms = latency_ms(Slow(), torch.zeros(1), runs=3, warmup=2)
    assert calls == [True] * 5
    assert 15 <= ms < 250


def test_bench_train_measures_input_model_and_whole_step():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "train", "--preset", "tiny", "--image-size", "32",
         "--set", "rec_width=4", "--set", "disc_width=4", "--set", "fcm_width=4", "--steps", "2", "--json"],
        capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    rates = ("input_samples_per_s", "model_step_samples_per_s", "train_step_samples_per_s")
    assert all(r[k] > 0 for k in rates)
    assert 0.0 <= r["waiting_for_input_share"] < 1.0
    assert abs(r["input_to_model_ratio"] - r["input_samples_per_s"] / r["model_step_samples_per_s"]) < 1e-9


def test_bench_train_measures_the_configured_synthesis_path():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "train", "--preset", "tiny", "--image-size", "32",
         "--set", "rec_width=4", "--set", "disc_width=4", "--set", "fcm_width=4", "--steps", "1", "--json",
         "--set", "synthesis=per_sample", "--num-workers", "1"],
        capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert (r["synthesis"], r["num_workers"]) == ("per_sample", 1) and r["input_samples_per_s"] > 0
    assert r["input_cpus"] == 1 and r["input_samples_per_s_per_cpu"] == r["input_samples_per_s"]


def test_cpus_needed_counts_the_input_cpus_and_the_model_process():
    from pouta_core.benchmark import cpus_needed

    assert cpus_needed(50.0, 400.0) == 9 and cpus_needed(60.0, 400.0) == 8 and cpus_needed(None, 400.0) == 1


def test_the_shipped_cpus_per_gpu_worker_are_the_manifests():
    # bench train compares what a GPU worker needs with this figure: it must be what ships.
    import re
    from pathlib import Path

    import yaml

    from orchestrator.cli.bench import SHIPPED_CPUS_PER_GPU_WORKER

    root = Path(__file__).resolve().parents[1] / "cluster"
    launcher = yaml.safe_load((root / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] == "g5.2xlarge"  # 8 vCPUs
    for name in ("raycluster.yaml", "rayjob-sweep.yaml"):
        cpus = re.findall(r'nvidia.com/gpu: "1"[^}]*cpu: "(\d+)"|cpu: "(\d+)"[^}]*nvidia.com/gpu: "1"',
                          (root / "kuberay" / name).read_text())
        assert cpus and all(int(a or b) == SHIPPED_CPUS_PER_GPU_WORKER for a, b in cpus), name


def test_bench_synthesis_times_both_paths_in_turns(tmp_path):
    from PIL import Image

    (tmp_path / "tex").mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "tex" / "a.png")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "synthesis", "--image-size", "32", "--samples", "8",
         "--batch-size", "4", "--rounds", "2", "--clean-ratio", "0.5", "--texture-dir", str(tmp_path / "tex"),
         "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert (r["image_size"], r["batch_size"], r["clean_ratio"], r["rounds"], r["textures"]) == (32, 4, 0.5, 2, True)
    assert r["batched_images_per_s_per_core"] > 0 and r["per_sample_images_per_s_per_core"] > 0
    ratio = r["batched_images_per_s_per_core"] / r["per_sample_images_per_s_per_core"]
    assert abs(r["batched_to_per_sample"] - ratio) < 1e-9
    assert "anomalib_images_per_s_per_core" not in r   # only with --compare-anomalib


def test_bench_synthesis_profile_counts_the_ops_of_a_batch_at_two_sizes():
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "synthesis", "--profile", "--image-size", "64",
         "--batch-size", "8", "--clean-ratio", "0.5", "--json"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert (r["image_size"], r["clean_ratio"], r["textures"]) == (64, 0.5, False)
    small, large = r["batch_8"], r["batch_32"]
    assert 0 < small["device_ops"] <= large["device_ops"] <= 150 and large["device_syncs"] == 0
    assert small["host_ops"] > 0 and r["targets"] == {"device_ops<=150": True, "device_syncs==0": True}


def test_bench_synthesis_without_the_anomalib_environment_says_how_to_make_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "synthesis", "--compare-anomalib",
         "--anomalib-python", str(tmp_path / "nope" / "python")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"pouta: error: {tmp_path / 'nope' / 'python'}: no anomalib environment; "
                                  "create it with `make bench-anomalib-env`")


def test_bench_scale_reads_the_drivers_cost_per_trial_over_the_first_and_last_tenth():
    """``pouta bench scale`` itself takes minutes (docs/experiments.md has its figures); its
    arithmetic is checked here: 20 trials finishing one a second, a driver spending 0.1 CPU s
    per trial at first and 0.3 s at the end (a cost that grew with the experiment)."""
    import math

    from orchestrator.commands.scale import driver_cpu_per_trial

    ends = [100.0 + i for i in range(20)]
    cpu, samples = 0.0, []
    for t in range(95, 125):
        samples.append((t + 0.5, cpu, 0))
        cpu += 0.1 if t < 110 else 0.3
    first, last = driver_cpu_per_trial(samples, ends)
    assert math.isclose(first, 0.1) and math.isclose(last, 0.3)
    assert all(math.isnan(v) for v in driver_cpu_per_trial(samples, ends[:2]))


def test_bench_scale_refuses_a_cluster_without_nodes_in_one_line():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "bench", "scale", "--nodes", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "pouta: error: --nodes must be >= 1, got 0"
