"""What a sweep tries: the search space turned into Optuna distributions (or a Tune grid), one
seeded Optuna study per category in RDB storage.

All categories run in one Tune experiment: one search per category behind a single searcher
(and one ASHA per category behind a single scheduler, :mod:`orchestrator.execution.schedulers`),
so the studies of every category share the cluster's trial slots (a slot freed by one category
goes to whichever study has work left) while no category's trials are ever compared with
another's.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.search import Searcher

from orchestrator.execution.search import CategorySearch, Confirmation
from orchestrator.spec import SAMPLED
from pouta_core.config import Config, ConfigError
from search_spaces import SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSearch:
    """What a sweep hands Tune: the param space, how many trials, the searcher, and the Optuna
    study of each category (none for a grid)."""

    param_space: dict[str, Any]
    num_samples: int
    search_alg: Searcher | None
    storage_url: str | None
    studies: dict[str, str]


def sweep_search(space: SearchSpace, configs: Mapping[str, Config], objectives: list[tuple[str, str]], *,
                 run_name: str, seed: int, num_samples: int, scheduler: str, storage_url: str | None,
                 resume: bool, default_trials: bool = True, confirmation: Confirmation | None = None) -> SweepSearch:
    """One Optuna study per category (``<run_name>-<category>``, seeded per category), or every
    grid point of every category for a grid space, once per seed. With ``scheduler`` ``asha``
    the searcher knows each category's epochs, to tell a trial ASHA stopped from a finished one.

    *Decision*: for a grid, ``num_samples`` is the number of seeds (``seed``, ``seed + 1``,
    ...): a grid point trained twice with one seed is the same trial twice, while the spread
    over seeds is what tells two variants apart (the paper's Table 4).

    A study's trials are its default, ``num_samples`` searched ones, then the confirmation round
    (:mod:`orchestrator.execution.search`): Tune is told the most it can take."""
    categories = list(configs)
    if space.has_grid:
        points = grid_space(space)
        if "seed" not in points:   # a space that searches the seed itself keeps its values
            points["seed"] = tune.grid_search([seed + i for i in range(num_samples)])
        return SweepSearch({"category": tune.grid_search(categories), SAMPLED: points}, 1, None, None, {})
    studies = {c: f"{run_name}-{c}" for c in categories}
    searchers = {c: optuna_search(space, objectives, storage_url, studies[c],
                                  # One seeded sampler per category: categories do not all try the same points.
                                  zlib.crc32(f"{seed}:{c}".encode()), resume) for c in categories}
    # Each category's default trial, then num_samples searched ones.
    per_category = num_samples + int(default_trials)
    search = CategorySearch(searchers, dict.fromkeys(categories, per_category), **metric_and_mode(objectives),
                            epochs={c: configs[c].epochs for c in categories} if scheduler == "asha" else None,
                            default_trials=default_trials, confirmation=confirmation,
                            seeds={c: configs[c].seed for c in categories}, reference=space.reference)
    return SweepSearch({}, search.total(), search, storage_url, studies)


def metric_and_mode(objectives: list[tuple[str, str]]) -> dict[str, Any]:
    """A searcher's ``metric`` and ``mode``: names for one objective, lists for several."""
    metrics, modes = [k for k, _ in objectives], [m for _, m in objectives]
    one = len(objectives) == 1
    return {"metric": metrics[0] if one else metrics, "mode": modes[0] if one else modes}


def optuna_space(space: SearchSpace) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for d in space.dimensions:
        key = f"{SAMPLED}/{d.key}"   # Tune unflattens "/" into {"sampled": {...}}
        if d.distribution in ("uniform", "loguniform"):
            out[key] = od.FloatDistribution(float(d.low), float(d.high), log=d.distribution == "loguniform")
        elif d.distribution == "int":
            out[key] = od.IntDistribution(int(d.low), int(d.high), step=d.step or 1)
        else:
            # Optuna's categorical values are scalars: lists travel as "yaml:" strings
            # (decoded by :func:`orchestrator.spec.decode_sampled`).
            out[key] = od.CategoricalDistribution(
                [f"yaml:{yaml.safe_dump(v, default_flow_style=True).strip()}" if isinstance(v, list) else v
                 for v in d.values])
    return out


def grid_point(space: SearchSpace) -> Callable[[dict[str, Any]], str]:
    """A trial's row -> its grid point (the grid's values, not the seed), as a string."""
    import json

    keys = [d.key for d in space.dimensions if d.distribution == "grid" and d.key != "seed"]
    return lambda row: json.dumps([row["config"].get(SAMPLED, {}).get(k) for k in keys], default=str)


def grid_space(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in space.dimensions:
        if d.distribution == "grid":
            out[d.key] = tune.grid_search(list(d.values))
        elif d.distribution == "choice":
            out[d.key] = tune.choice(list(d.values))
        elif d.distribution == "uniform":
            out[d.key] = tune.uniform(d.low, d.high)
        elif d.distribution == "loguniform":
            out[d.key] = tune.loguniform(d.low, d.high)
        else:
            out[d.key] = tune.qrandint(d.low, d.high, d.step or 1)
    return out


RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
JOURNAL = "journal:///"
MOUNTS = "/proc/mounts"
# Filesystems other machines write too (mount types as /proc/mounts names them). SQLite's
# locks do not hold on them (sqlite.org/howtocorrupt.html, §2.1): two drivers (two RayJobs'
# head pods) writing one file there corrupt it. FUSE mounts are mostly object stores
# (gcsfuse, s3fs, mountpoint-s3), save the two that are a container's own disk.
NETWORK_FS = ("nfs", "cifs", "smb", "lustre", "gpfs", "ceph", "glusterfs", "9p", "beegfs", "afs", "fuse.")
LOCAL_FUSE = ("fuse.fuse-overlayfs", "fuse.lxcfs")


def journal_url(path: str | Path) -> str:
    """``journal:///abs/path`` for an Optuna journal file (read back by :func:`open_study_storage`)."""
    return f"{JOURNAL}{Path(path).resolve().as_posix().lstrip('/')}"


def shared_filesystem(path: str | Path, mounts: str = MOUNTS) -> str | None:
    """The type of the network filesystem ``path`` is on (``nfs4``), or None when it is a
    local one (or the mount table cannot be read)."""
    target = Path(path).resolve()
    try:
        table = [line.split() for line in Path(mounts).read_text().splitlines()]
    except OSError:
        return None
    best, kind = "", None
    for fields in table:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == Path(point) or Path(point) in target.parents) and len(point) >= len(best):
            best, kind = point, fields[2]
    if kind and kind.startswith(NETWORK_FS) and kind not in LOCAL_FUSE:
        return kind
    return None


def check_study_storage(url: str, mounts: str = MOUNTS) -> str:
    """``--study-storage``: a database URL Optuna's RDB storage opens (SQLAlchemy's form), or
    ``journal:///path`` (Optuna's journal file). SQLite on a network filesystem is refused."""
    if url.startswith(JOURNAL):
        if not url.removeprefix(JOURNAL):
            raise ConfigError(f"--study-storage {url}: expected journal:///path/to/optuna.journal")
        return url
    scheme = url.partition("://")[0].partition("+")[0]
    if "://" not in url or scheme not in RDB_SCHEMES:
        raise ConfigError(f"--study-storage {url}: expected a database URL (sqlite:///path.db, "
                          "postgresql://user@host/db, mysql://...) or journal:///path/to/optuna.journal")
    file = url.partition(":///")[2].partition("?")[0]
    kind = shared_filesystem(Path(file).parent, mounts) if scheme == "sqlite" and file else None
    if kind:
        raise ConfigError(f"--study-storage {url}: {file} is on a network filesystem ({kind}), where SQLite's "
                          f"locks do not hold; use {journal_url(Path(file).with_suffix('.journal'))} or a "
                          "postgresql:// URL")
    return url


def open_study_storage(url: str):
    """The Optuna storage ``url`` names (see :func:`check_study_storage`).

    *Decision* (issue 28): the journal's lock is ``JournalFileOpenLock`` (an ``O_EXCL`` lock
    file), which Optuna documents for NFSv3 and later; its default symlink lock is not."""
    import optuna

    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = "/" + url.removeprefix(JOURNAL).lstrip("/")
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    return optuna.storages.RDBStorage(url)


def default_study_storage(storage_path: str, run_name: str, mounts: str = MOUNTS) -> str:
    """The Optuna storage of experiment ``run_name``: a file in its own folder, SQLite on a
    local disk and Optuna's journal on a network filesystem (a multi-node cluster's shared
    ``--storage-path``).

    *Decision* (issue 28): one file per experiment, not one for the whole ``--storage-path``:
    only the driver writes its studies, so two sweeps (two RayJobs' head pods over NFS) never
    write one file, and an experiment's folder holds everything it is. An experiment started
    before this (its studies in the shared ``optuna.db``) keeps that file."""
    root = Path(storage_path).resolve()
    shared = root / "optuna.db"
    if shared.is_file():
        import optuna

        names = optuna.study.get_all_study_names(optuna.storages.RDBStorage(f"sqlite:///{shared}"))
        if any(n.startswith(f"{run_name}-") for n in names):
            log.info("experiment %s: its studies are in %s (started before per-experiment storage)", run_name, shared)
            return f"sqlite:///{shared}"
    folder = root / run_name
    folder.mkdir(parents=True, exist_ok=True)
    kind = shared_filesystem(folder, mounts)
    if kind or (folder / "optuna.journal").is_file():
        if kind:
            log.info("experiment %s: %s is on %s; its Optuna studies are a journal file there", run_name, folder, kind)
        return journal_url(folder / "optuna.journal")
    return f"sqlite:///{folder / 'optuna.db'}"


def optuna_search(space: SearchSpace, objectives, storage_url: str, study_name: str, seed: int, resume: bool):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = open_study_storage(storage_url)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if study_name in existing and not resume:
        raise ConfigError(f"optuna study '{study_name}' already exists in {storage_url}; pass --resume to "
                          "continue it or --name to start another")
    return OptunaSearch(space=optuna_space(space), **metric_and_mode(objectives),
                        # constant_liar (Optuna 5's default, said here): trials running at once
                        # count as bad guesses at their points, so TPE does not propose them again.
                        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True), storage=storage,
                        study_name=study_name)


def fail_dangling_optuna_trials(search: SweepSearch) -> None:
    """After a finished sweep no Optuna trial may stay RUNNING: one asked for by a driver that
    died before Tune saved the trial it belonged to is marked FAIL (it never ran to the end)."""
    if search.storage_url is None:
        return
    import optuna
    from optuna.trial import TrialState

    storage = open_study_storage(search.storage_url)
    for name in search.studies.values():
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("optuna study %s: trial %d was left RUNNING by an interrupted driver; marked FAIL",
                        name, trial.number)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


