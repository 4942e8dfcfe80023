"""Bad input, table-driven: each row is an input a user meets (a camera's file, a folder left
by another run, a typo), the exit status, a fragment of the one-line message, and whether
``--out`` must stay as it was. Real files on disk, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_args
from PIL import Image

from pouta_core import runfolder
from pouta_core.data.demo import generate

TINY = [*small_args(epochs=1), "--device", "cpu"]


def pouta(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit grey or RGB PNG, as industrial cameras write them (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def bomb(path: Path) -> None:
    """A valid PNG header claiming 100000 x 100000 pixels, and one tiny data block."""
    png16(path, np.zeros((1, 1), np.uint16))
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Demo data (tiles, pills) and a trained tiles run folder, both copied by each row."""
    root = tmp_path_factory.mktemp("bad")
    generate(root / "data", categories=2, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)
    out = pouta("train", "--data-root", root / "data", "--dataset", "mvtec", "--category", "tiles",
                "--out", root / "run", *TINY)
    assert out.returncode == 0, out.stderr
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@dataclass
class Case:
    name: str
    prepare: Callable[[Path], list[str]]    # gets a fresh copy of the base folder -> CLI arguments
    code: int
    message: str
    out_unchanged: bool = True


def train_args(root: Path, category: str = "tiles", out: str = "run") -> list[str]:
    return ["train", "--data-root", root / "data", "--dataset", "mvtec", "--category", category,
            "--out", root / out, *TINY]


def first_train_image(root: Path, category: str = "tiles") -> Path:
    return sorted((root / "data" / category / "train" / "good").iterdir())[0]


def corrupt(root):
    first_train_image(root).write_bytes(b"\x89PNG not really")
    return train_args(root, out="new")


def truncated(root):
    p = first_train_image(root)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return train_args(root, out="new")


def empty(root):
    first_train_image(root).write_bytes(b"")
    return train_args(root, out="new")


def bomb_in_train(root):
    bomb(first_train_image(root))
    return train_args(root, out="new")


def mask_size(root):
    mask = sorted((root / "data" / "tiles" / "ground_truth").rglob("*.png"))[0]
    Image.new("L", (7, 9)).save(mask)
    return train_args(root, out="new")


def missing_mask(root):
    sorted((root / "data" / "tiles" / "ground_truth").rglob("*.png"))[0].unlink()
    return train_args(root, out="new")


def empty_split(root):
    for p in (root / "data" / "tiles" / "train" / "good").iterdir():
        p.unlink()
    return train_args(root, out="new")


def unknown_category(root):
    return train_args(root, category="cables", out="new")


def path_escape(root):
    visa = root / "visa"
    (visa / "split_csv").mkdir(parents=True)
    (visa / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n"
                                                 "pcb1,train,normal,../../etc/passwd,\n")
    return ["train", "--data-root", visa, "--dataset", "visa", "--category", "pcb1", "--out", root / "new", *TINY]


def other_category(root):
    return train_args(root, category="pills")       # into the tiles run folder


def changed_data(root):
    img = first_train_image(root)
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    return train_args(root)


def busy(root):
    # This test process holds the folder, as a live `pouta train` would.
    busy.hold = runfolder.claim(root / "run")
    busy.hold.__enter__()
    return train_args(root)


def wrong_checkpoint(root):
    state = torch.load(root / "run" / "checkpoint.pt", weights_only=True)
    key = next(k for k, v in state["model"].items() if v.ndim == 4)
    state["model"][key] = torch.zeros(3, 3, 3, 3)
    torch.save(state, root / "run" / "checkpoint.pt")
    return ["evaluate", "--checkpoint", root / "run", "--data-root", root / "data", "--dataset", "mvtec",
            "--category", "tiles", "--device", "cpu"]


def garbage_checkpoint(root):
    (root / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return ["predict", "--checkpoint", root / "run", root / "data" / "tiles" / "test" / "good", "--out", root / "new"]


def bomb_in_predict(root):
    bomb(root / "big.png")
    return ["predict", "--checkpoint", root / "run", root / "big.png", "--out", root / "new"]


def set_nan(root):
    return [*train_args(root, out="new"), "--set", "lr=nan"]


def set_negative(root):
    return [*train_args(root, out="new"), "--set", "epochs=-3"]


def set_unknown(root):
    return [*train_args(root, out="new"), "--set", "learning_rate=0.1"]


CASES = [
    Case("corrupt image", corrupt, 2, "cannot decode image"),
    Case("truncated image", truncated, 2, "cannot decode image"),
    Case("empty image file", empty, 2, "empty file (0 bytes)"),
    Case("decompression bomb in train", bomb_in_train, 2, "over the limit of 89,478,485 (a decompression bomb"),
    Case("mask of another size", mask_size, 2, "mask is 7x9 but its image"),
    Case("defect without mask", missing_mask, 2, "defect image without a mask"),
    Case("empty train split", empty_split, 2, "empty train split"),
    Case("unknown category", unknown_category, 2, "unknown category 'cables'"),
    Case("path escaping the data root", path_escape, 2, "escapes the data root"),
    Case("another category's run folder", other_category, 2, "belongs to another run (it holds category 'tiles'"),
    Case("training images changed", changed_data, 2, "belongs to another run (the training images changed)"),
    Case("run folder in use", busy, 2, f"in use by PID {os.getpid()} on "),
    Case("checkpoint of other shapes", wrong_checkpoint, 2, "weights do not fit the model its config describes"),
    Case("not a checkpoint", garbage_checkpoint, 2, "not a readable POUTA checkpoint"),
    Case("bomb in predict", bomb_in_predict, 1, "big.png: image of 10,000,000,000 pixels is over the limit"),
    Case("--set NaN", set_nan, 2, "--set lr=nan: config key 'lr': must be finite"),
    Case("--set negative", set_negative, 2, "--set epochs=-3: config key 'epochs'"),
    Case("--set unknown key", set_unknown, 2, "--set learning_rate=0.1: unknown config key 'learning_rate'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path):
    root = tmp_path / "w"
    shutil.copytree(base, root)
    args = case.prepare(root)
    before = {name: snapshot(root / name) for name in ("run", "new")}
    try:
        out = pouta(*args)
    finally:
        if getattr(case.prepare, "hold", None) is not None:
            case.prepare.hold.__exit__(None, None, None)
            case.prepare.hold = None
    assert out.returncode == case.code, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("pouta: ")]
    assert case.message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    if case.code == 2:
        assert len(lines) == 1 and lines[0].startswith("pouta: error: "), out.stderr
    if case.out_unchanged:
        assert {name: snapshot(root / name) for name in ("run", "new")} == before


def test_predict_scores_every_readable_image_and_lists_the_rest(base, tmp_path):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    good = sorted((base / "data" / "tiles" / "test" / "good").iterdir())
    shutil.copy(good[0], images / "x.png")
    Image.open(good[1]).convert("RGB").save(images / "x.jpg")
    shutil.copy(good[2], images / "sub" / "x.png")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (1, 1), (90, 90, 90)).save(images / "tiny.bmp")
    out = pouta("predict", "--checkpoint", base / "run", images, "--out", tmp_path / "out", "--json")
    assert out.returncode == 1, out.stderr
    result = json.loads(out.stdout)
    assert len(result["scored"]) == 4
    assert [f["image"] for f in result["failed"]] == [str((images / "broken.png").resolve())]
    assert "1 of 5 images could not be read" in out.stderr and "broken.png: cannot decode image" in out.stderr
    assert "smaller than the model input 32x32 (smallest 1x1): upscaled" in out.stderr
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["sub/x.png.overlay.png", "tiny.bmp.overlay.png", "x.jpg.overlay.png", "x.png.overlay.png"]


def test_a_16_bit_png_scores_as_its_8_bit_version(base, tmp_path):
    good = sorted((base / "data" / "tiles" / "test" / "good").iterdir())[0]
    rgb8 = np.asarray(Image.open(good).convert("RGB"))
    rng = np.random.default_rng(0)
    # 16-bit samples whose high byte is the 8-bit image, low byte noise (what a camera adds).
    rgb16 = rgb8.astype(np.uint16) * 256 + rng.integers(0, 256, rgb8.shape).astype(np.uint16)
    png16(tmp_path / "rgb16.png", rgb16)
    png16(tmp_path / "grey16.png", rgb16[..., 1])
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png")
    Image.fromarray(rgb8[..., 1]).save(tmp_path / "grey8.png")
    out = pouta("predict", "--checkpoint", base / "run", *(tmp_path / f"{n}.png" for n in
                ("rgb16", "rgb8", "grey16", "grey8")), "--out", tmp_path / "out", "--json")
    assert out.returncode == 0, out.stderr
    scores = {Path(r["image"]).stem: r["score"] for r in json.loads(out.stdout)["scored"]}
    assert scores["rgb16"] == pytest.approx(scores["rgb8"], abs=1e-3)
    assert scores["grey16"] == pytest.approx(scores["grey8"], abs=1e-3)


def test_rgba_is_composited_over_black_with_one_warning(tmp_path):
    from pouta_core.data.images import load_image

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :20, 3] = 255           # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", 40).numpy()
    assert (img[:, :, :19] == 200).all() and (img[:, :, 21:] == 0).all()


class _Session:
    """The worker's session interface, in this process (rank 0 of 1, CPU)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def get_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir):
        pass

    def prepare_model(self, model, *, find_unused_parameters=False):
        return model


def test_trials_decode_under_the_drivers_image_limit(tmp_path):
    # --max-image-pixels on launch/sweep/retrain travels in the trial's DataSpec: a worker
    # process on another node refuses what the driver's limit refuses.
    from conftest import small_config

    from orchestrator.execution.worker import train_worker
    from orchestrator.spec import DataSpec, Resources, WorkerTask
    from pouta_core.data.errors import DataError
    from pouta_core.data.images import DEFAULT_MAX_PIXELS, set_max_image_pixels

    generate(tmp_path / "data", categories=1, image_size=48, n_train=4, n_test_good=4, n_test_defect=2)
    task = WorkerTask("tiles", small_config(epochs=1), DataSpec.of(str(tmp_path / "data"), "mvtec",
                                                                  max_image_pixels=1000), Resources())
    try:
        with pytest.raises(DataError, match="over the limit of 1,000"):
            train_worker(task, _Session())
    finally:
        set_max_image_pixels(DEFAULT_MAX_PIXELS)
    out = pouta("sweep", "--help")
    assert "--max-image-pixels" in out.stdout
