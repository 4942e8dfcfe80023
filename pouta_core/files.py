"""Files written so that a kill never leaves half of one: a temporary name beside the
target, flushed to disk, then renamed over it. Plain modes (``0666`` less the umask), not the
``0600`` of ``mkstemp``: outputs are for the team, not only their writer."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = "."     # temporary files are ".<name>.<random>", hidden beside their target
TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *,
                 before_replace: Callable[[], Any] | None = None) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it over ``path``
    (``before_replace()`` runs just before the rename, once the file is complete on disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Temporary files :func:`atomic_write` left in ``folder`` when its process was killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_SUFFIX))


def json_safe(obj: Any) -> Any:
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(json_safe(data), indent=2).encode()))
