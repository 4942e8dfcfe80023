"""A run folder (``pouta train --out``) belongs to one run at a time, and holds one state.

- **One writer**: an advisory ``flock`` on ``.pouta.lock`` in the folder, held for the whole
  run. A second process is refused at once with the PID and host of the holder. The kernel
  drops the lock when its process dies, so a lock left by a killed run is simply taken
  over. (``flock`` works on local disks and on NFS v4; on other network filesystems the
  lock may not reach other machines.)
- **One state**: ``checkpoint.pt`` is the state; ``config.yaml``, ``metrics.json`` and the
  other JSON sidecars are views of it. A checkpoint is written to a temporary file, the
  sidecars that change are removed, the checkpoint is renamed into place, and then the
  sidecars are written. A kill at any instant leaves a complete checkpoint (old or new) and
  sidecars that are either its own or missing; :func:`repair` writes missing ones back from
  the checkpoint and removes temporary files of killed writes.
- **One run**: a folder resumes only the run it holds: same config (checked by
  ``training.restore``), dataset, category and training data (:func:`check_identity`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pouta_core import checkpoint as ckpt
from pouta_core.config import Config, ConfigError
from pouta_core.files import stale_temp_files, write_json

log = logging.getLogger(__name__)

LOCK = ".pouta.lock"
IDENTITY_KEYS = ("dataset", "category", "data_fingerprint")


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError):
        text = lock.read_text().split()
        if len(text) >= 2:
            return f"PID {text[0]} on {text[1]}"
    return "another process"


def _try_lock(fd: int, folder: Path, lock: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderBusy(f"{folder}: in use by {_holder(lock)}; wait for that run to end "
                            "or choose another --out") from None


def check_free(folder: str | os.PathLike[str]) -> None:
    """Refuse at once, writing nothing, when a live process holds ``folder``."""
    lock = Path(folder) / LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return
    _try_lock(fd, Path(folder), lock)
    os.close(fd)   # closing the only descriptor drops the lock again


@contextlib.contextmanager
def claim(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for the ``with`` block, and clean what killed
    writers left in it. Raises :class:`RunFolderBusy` when another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    _try_lock(fd, folder, lock)
    try:
        previous = _holder(lock)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        if previous != "another process" and not previous.startswith(f"PID {os.getpid()} "):
            log.info("%s: taking over the lock left by %s (no longer running)", folder, previous)
        for stale in stale_temp_files(folder):
            log.info("removing %s, left by a killed write", stale)
            stale.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)


def fingerprint(paths: Iterable[Path], root: Path) -> str:
    """sha256 over the sorted relative paths and contents of the training files."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.resolve().relative_to(root.resolve())).encode())
        h.update(b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_identity(folder: str | os.PathLike[str], identity: dict[str, str]) -> None:
    """Refuse to resume a checkpoint of another dataset, category or training data."""
    path = Path(folder) / ckpt.CHECKPOINT
    if not path.is_file():
        return
    saved = ckpt.load_state(path)
    for key in IDENTITY_KEYS:
        if key in identity and key in saved and saved[key] != identity[key]:
            what = "the training images changed" if key == "data_fingerprint" else \
                f"it holds {key} '{saved[key]}', not '{identity[key]}'"
            raise ConfigError(f"{path}: belongs to another run ({what}); choose another --out, "
                              "or --no-resume to train over it")


def sidecars_of(state: dict[str, Any]) -> dict[str, Any]:
    """The files a checkpoint's folder shows beside it, rebuilt from the checkpoint alone."""
    return {ckpt.METRICS: {**state.get("metrics", {}), "threshold": state.get("threshold")},
            **state.get("sidecars", {})}


def repair(folder: str | os.PathLike[str]) -> list[str]:
    """Write back the sidecars a kill left missing, from the checkpoint. -> their names."""
    folder = Path(folder)
    path = folder / ckpt.CHECKPOINT
    if not path.is_file():
        return []
    state = ckpt.load_state(path)
    written = []
    if not (folder / ckpt.CONFIG).is_file():
        Config.from_dict(state["config"], source=str(path)).to_yaml(folder / ckpt.CONFIG)
        written.append(ckpt.CONFIG)
    for name, data in sidecars_of(state).items():
        if not (folder / name).is_file():
            write_json(folder / name, data)
            written.append(name)
    if written:
        log.warning("%s: restored %s from the checkpoint (the last run was killed while writing)",
                    folder, ", ".join(written))
    return written
