"""Weights by name: what ``predict``, ``evaluate`` and ``export`` accept as ``--model``.

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered model version. Its source
  run (the trial that produced it) holds the POUTA checkpoint, which is what is downloaded
  and loaded (``torch.load(weights_only=True)``), not the pickled MLflow model.
- ``runs:/RUN_ID`` (the run's ``checkpoint`` artifact) or ``runs:/RUN_ID/PATH``.
- a run folder or ``checkpoint.pt``; a Ray trial folder (its latest ``checkpoint_*``).

The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded default; a
store that does not exist is an error (reading never creates one), and every "not found"
names the store it searched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pouta_core.checkpoint import CHECKPOINT
from pouta_core.config import ConfigError

log = logging.getLogger(__name__)
URI_SCHEMES = ("models:/", "runs:/")


def existing_store(uri: str | None) -> str:
    """The tracking store to read from; a local store that is not there is refused."""
    from orchestrator.tracking import resolve_tracking_uri

    chosen = resolve_tracking_uri(uri)
    db = Path(chosen.removeprefix("sqlite:///"))
    if chosen.startswith("sqlite:///") and not db.is_file():
        if not (uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ConfigError(f"no MLflow store at {db} (the default): pass --tracking-uri or set "
                              "MLFLOW_TRACKING_URI")
        raise ConfigError(f"{chosen}: no such MLflow store")
    return chosen


def local_checkpoint(path: Path) -> Path:
    """A run folder, a ``checkpoint.pt``, or a Ray trial folder -> the checkpoint's folder or file."""
    if path.is_file() or (path / CHECKPOINT).is_file():
        return path
    found = sorted(path.glob(f"checkpoint_*/{CHECKPOINT}"))
    if found:
        log.info("%s: using the trial's latest checkpoint, %s", path, found[-1].parent.name)
        return found[-1].parent
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    raise ConfigError(f"{path}: no {CHECKPOINT} here, nor in a checkpoint_* folder of a Ray trial")


def _sources(ref: str, store: str) -> tuple[str, list[str]]:
    """-> (the run id, the artifact URIs that may hold its checkpoint, in the order tried) for
    a ``models:/`` or ``runs:/`` URI. A registered version carries ``checkpoint.pt`` in its
    pyfunc's artifacts (:mod:`.serving`); versions registered before issue 32 in their run's
    ``checkpoint`` folder.

    The model's files are named by their storage location (what the store says), never by a
    ``models:/`` URI: MLflow resolves those through the process's default registry whatever
    store it is given (3.17), which searched, and created, ``./mlflow.db``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store, registry_uri=store)
    in_model = f"artifacts/{CHECKPOINT}"
    try:
        if ref.startswith("runs:/"):
            run_id, _, path = ref.removeprefix("runs:/").partition("/")
            run = client.get_run(run_id)
            if path:
                return run_id, [f"runs:/{run_id}/{path}"]
            models = [client.get_logged_model(m.model_id).artifact_location
                      for m in (run.outputs.model_outputs if run.outputs else [])]
            return run_id, [f"runs:/{run_id}/checkpoint", *(f"{m}/{in_model}" for m in models)]
        rest = ref.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            if not name:
                raise ConfigError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            version = client.get_model_version(name, number)
        location = client.get_model_version_download_uri(version.name, version.version)
    except MlflowException as exc:
        raise ConfigError(f"{ref}: not found in {store} ({str(exc).splitlines()[0]})") from None
    if not version.run_id:
        raise ConfigError(f"{ref}: version {version.version} has no source run in {store}")
    return version.run_id, [f"{location}/{in_model}", f"runs:/{version.run_id}/checkpoint"]


def download_checkpoint(ref: str, store: str, dest: str | Path) -> Path:
    """Download the checkpoint a ``models:/`` or ``runs:/`` URI names into ``dest`` -> its local path."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id, sources = _sources(ref, store)
    failure = ""
    for uri in sources:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=store,
                                                        registry_uri=store)
            return local_checkpoint(Path(local))
        except (MlflowException, OSError, ConfigError) as exc:
            failure = failure or str(exc).splitlines()[0]
    hint = _weights_hint(run_id, store) if ref.startswith("runs:/") else ""
    raise ConfigError(f"{ref}: run {run_id} in {store} holds no checkpoint ({failure}){hint}") from None


@contextlib.contextmanager
def resolved(ref: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """The local checkpoint ``ref`` names, downloaded for the ``with`` block when it is a URI."""
    if not ref.startswith(URI_SCHEMES):
        yield local_checkpoint(Path(ref))
        return
    store = existing_store(tracking_uri)
    tmp = tempfile.mkdtemp(prefix="pouta-model-")
    try:
        yield download_checkpoint(ref, store, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weights_hint(run_id: str, store: str) -> str:
    """Where a trial run's weights are when MLflow has none: only registered versions get them
    (issue 28); every trial's run names its checkpoint in Ray's storage."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.records import TAG_CHECKPOINT

    try:
        where = MlflowClient(store).get_run(run_id).data.tags.get(TAG_CHECKPOINT)
    except MlflowException:
        return ""
    if not where:
        return ""
    if not Path(where).is_dir():   # a finished sweep keeps the weights of the trials it still needs only
        return (f"; only registered versions keep weights in MLflow, and this trial's checkpoint ({where}) was "
                "removed when its sweep ended (a sweep keeps its registered, default and finalist trials' weights; "
                "--keep-checkpoints keeps all)")
    return f"; only registered versions keep weights in MLflow, this trial's are in Ray's storage: --model {where}"
