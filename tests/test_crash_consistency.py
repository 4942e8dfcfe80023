"""A run folder after a SIGKILL at any instant of a save: the checkpoint is complete (the
previous one or the new one) and every view beside it (config.yaml, metrics.json,
val_files.json) is the checkpoint's own or missing; a rerun writes the missing ones back,
removes the killed write's temporary files, and finishes. The kill comes from inside the
process (SIGKILL to its own PID) at a chosen file-system event, so every instant is hit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_args

from pouta_core import checkpoint as ckpt
from pouta_core import runfolder
from pouta_core.data.demo import generate
from pouta_core.files import json_safe, stale_temp_files

TRAIN = ["train", "--dataset", "mvtec", "--category", "tiles", *small_args(checkpoint_every=1), "--device", "cpu"]

# Runs `pouta` with os.fsync / os.replace / os.unlink wrapped: each call on the run folder is
# an event, logged; at event number TARGET the process SIGKILLs itself.
KILLER = textwrap.dedent("""
    import os, signal, sys
    out, target, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    count = 0
    def hit(kind, path):
        global count
        count += 1
        with open(log, "a") as fh:
            fh.write(f"{count} {kind} {os.path.basename(str(path))}\\n")
        if count == target:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace, real_fsync, real_unlink = os.replace, os.fsync, os.unlink
    def replace(src, dst, *a, **k):
        if not str(dst).startswith(out):
            return real_replace(src, dst, *a, **k)
        hit("before-rename", dst)
        real_replace(src, dst, *a, **k)
        hit("after-rename", dst)
    def fsync(fd):
        real_fsync(fd)
        hit("written", os.readlink(f"/proc/self/fd/{fd}"))
    def unlink(path, *a, **k):
        real_unlink(path, *a, **k)
        if str(path).startswith(out):
            hit("removed", path)
    os.replace, os.fsync, os.unlink = replace, fsync, unlink
    from orchestrator.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def run(script: Path, data: Path, out: Path, target: int, log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), str(out), str(target), str(log), *TRAIN,
                           "--data-root", str(data), "--out", str(out)], capture_output=True, text=True, timeout=300)


def check_consistent(out: Path) -> int:
    """The folder holds one state: -> the checkpoint's epoch."""
    state = torch.load(out / ckpt.CHECKPOINT, weights_only=True)
    views = {name: json.loads(json.dumps(json_safe(data))) for name, data in runfolder.sidecars_of(state).items()}
    for name, expected in views.items():
        if (out / name).exists():
            assert json.loads((out / name).read_text()) == expected, name
    if (out / ckpt.CONFIG).exists():
        assert yaml.safe_load((out / ckpt.CONFIG).read_text()) == state["config"]
    return int(state["epoch"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    generate(root / "data", categories=1, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    script = root / "killer.py"
    script.write_text(KILLER)
    log = root / "reference.log"
    done = run(script, root / "data", root / "reference", 0, log)
    assert done.returncode == 0, done.stderr
    events = log.read_text().splitlines()
    # The events of the final save: after the first checkpoint is in place.
    first = next(i for i, e in enumerate(events) if e.endswith("after-rename checkpoint.pt"))
    return root, script, [int(e.split()[0]) for e in events[first + 1:]], events


def test_the_reference_run_saves_twice_and_leaves_one_state(setup):
    root, _, final_save, events = setup
    assert sum(e.endswith("after-rename checkpoint.pt") for e in events) == 2
    assert len(final_save) >= 10
    assert check_consistent(root / "reference") == 2
    assert not stale_temp_files(root / "reference")


def test_a_kill_at_any_event_of_a_save_leaves_one_state_and_a_rerun_finishes(setup, tmp_path):
    root, script, final_save, events = setup
    outcomes = {}
    for target in final_save:
        out = tmp_path / f"kill-{target}"
        killed = run(script, root / "data", out, target, tmp_path / f"{target}.log")
        assert killed.returncode == -9, (target, killed.stderr[-2000:])
        outcomes[events[target - 1]] = check_consistent(out)
    # Killed before the new checkpoint's rename: the previous state; after it: the new one.
    assert set(outcomes.values()) == {1, 2}, outcomes
    # The rerun of a few killed folders: inside a write, between the checkpoint and its
    # views, after all but one view.
    for target in (final_save[0], final_save[len(final_save) // 2], final_save[-2]):
        out = tmp_path / f"kill-{target}"
        rerun = run(script, root / "data", out, 0, tmp_path / "rerun.log")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert check_consistent(out) == 2
        assert {p.name for p in out.iterdir()} == {".pouta.lock", "checkpoint.pt", "config.yaml", "metrics.json",
                                                  "val_files.json"}
        assert "trained tiles" in rerun.stdout and "val_pixel_ap" in rerun.stdout
