"""The registry: the chosen trial's weights logged as an image-serving MLflow pyfunc, registered
as ``pouta-<dataset>-<category>`` with the alias ``challenger``, and a model version page that
says what it is and why it was chosen."""

from __future__ import annotations

import base64
import io
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.execution.results import SCORING
from orchestrator.plan import SUMMARY_METRICS, Plan
from orchestrator.spec import SAMPLED, decode_sampled, short
from orchestrator.tracking.callback import MlflowTrialCallback
from orchestrator.tracking.serving import ARTIFACT, CHECKPOINT_KEY, INPUT_COLUMN, MODEL_CODE, SIGNATURE


def registered_name(dataset: str, category: str) -> str:
    return f"pouta-{dataset}-{category}"


def promote(client: MlflowClient, name: str, version: str | int, alias: str = tracking.CHAMPION) -> None:
    """Point ``alias`` at ``version`` of registered model ``name`` (it must exist)."""
    client.get_model_version(name, str(version))   # raises a clear MlflowException if missing
    client.set_registered_model_alias(name, alias, str(version))


def register_choices(plan: Plan, cb: MlflowTrialCallback, chosen: dict[str, dict[str, Any]], keys: list[str],
                     kind: str) -> dict[str, dict[str, Any]]:
    """Register each category's chosen trial (:func:`orchestrator.execution.results.choose`) as
    its challenger -> the summary per category: its trials, its best (``keys``), the config it
    trained with, and the registered model version; or its error."""
    summary: dict[str, dict[str, Any]] = {}
    for category, entry in chosen.items():
        best = entry.get("best")
        if best is None:
            summary[category] = entry
            continue
        # The searched values and, when the space lists scoring options, the reading chosen after training.
        sampled = {**best["config"].get(SAMPLED, {}), **best.get(SCORING, {})}
        name, version = register_best(plan, cb, category, best["trial_id"], best["checkpoint"],
                                      searched=decode_sampled(sampled), kind=kind,
                                      note=(entry.get("versus_default") or {}).get("line"))
        summary[category] = {**entry, "best": {k: best.get(k) for k in ["trial_id", "epoch", SCORING, *keys]
                                               if k != SCORING or k in best},
                             "config": cb.spec.config_for(category, sampled).to_dict(),   # what it trained with
                             "registered_model": name, "version": version}
    return summary


def example_image(size: int = 8) -> str:
    """A small grey PNG, base64: the logged input example (MLflow's UI shows it as a request)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def input_example() -> pd.DataFrame:
    return pd.DataFrame({INPUT_COLUMN: [example_image()]})


def model_requirements() -> list[str]:
    """What loading the model needs besides MLflow: torch, numpy, pillow, pandas at this
    process's versions; the ``pouta`` package itself must be installed where the model is
    served (it is not on PyPI), which ``mlflow models serve --env-manager local`` and
    ``pouta serve`` do."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "pillow", "pandas")]


def log_image_model(state: dict[str, Any], registered_model_name: str | None = None):
    """Log the pyfunc over ``state`` (a checkpoint's state; its optimizer state is dropped)
    into the active run as
    :data:`~orchestrator.tracking.serving.ARTIFACT` -> MLflow's ``ModelInfo``."""
    from pouta_core import checkpoint as ckpt

    with tempfile.TemporaryDirectory(prefix="pouta-model-") as tmp:
        path = ckpt.save_checkpoint(Path(tmp), ckpt.inference_state(state))
        return mlflow.pyfunc.log_model(
            name=ARTIFACT, python_model=MODEL_CODE, artifacts={CHECKPOINT_KEY: str(path)},
            signature=SIGNATURE, input_example=input_example(),
            pip_requirements=model_requirements(), registered_model_name=registered_model_name)


def describe_version(client, name: str, version: str, *, category: str, fingerprint: str,
                     metrics: dict[str, float], searched: dict[str, Any], source: str, parent_run_id: str,
                     selection: str, note: str | None = None, decision: str = "") -> None:
    """Tags and a Markdown description on a model version, so its page in the MLflow UI says
    what it is and why it was chosen: category, data fingerprint, validation metrics (the
    choice) and test metrics (reported only), the searched values, and the source run."""
    shown = [k for k in SUMMARY_METRICS if f"val_{k}" in metrics]
    tags = {"category": category, tracking.TAG_FINGERPRINT: fingerprint, "source": source,
            "source_parent_run": parent_run_id, tracking.TAG_SELECTION: selection,
            **{f"{split}_{k}": f"{metrics[f'{split}_{k}']:.4f}" for split in ("val", "test") for k in shown
               if isinstance(metrics.get(f"{split}_{k}"), float) and math.isfinite(metrics[f"{split}_{k}"])},
            **{f"searched.{k}": short(v) for k, v in searched.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)

    def cell(v: float | None) -> str:
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "n/a"

    rows = "\n".join(f"| {k} | {cell(metrics.get(f'val_{k}'))} | {cell(metrics.get(f'test_{k}'))} |" for k in shown)
    values = ", ".join(f"`{k}={short(v)}`" for k, v in searched.items()) or "the base config (nothing searched)"
    against = f"Against the sweep's default: {note.split(': ', 1)[-1]}.\n\n" if note else ""
    decides = f"Decision (`anomalous`): {decision}.\n\n" if decision else ""
    description = (f"POUTA model for **{category}**, chosen by {source} on the **{selection}** split "
                   f"(parent run `{parent_run_id}`).\n\n| metric | validation (chosen on) | test (reported) |\n"
                   f"|---|---|---|\n{rows}\n\nSearched values: {values}.\n\n{against}{decides}"
                   f"Training data fingerprint: `{fingerprint[:16]}`.\n\nServe it with `pouta serve --model "
                   f"models:/{name}/{version}`: base64 images in (column `image`), per image `score`, `anomalous`, "
                   f"`threshold` and `map` out (params `threshold`, `map_size`). `pouta predict --model "
                   f"models:/{name}/{version}` scores files; `pouta export` gives the raw tensor model.")
    client.update_model_version(name, version, description=description)


def register_best(plan: Plan, cb: MlflowTrialCallback, category: str, trial_id: str, checkpoint: str,
                  searched: dict[str, Any] | None = None, kind: str = "launch", note: str | None = None
                  ) -> tuple[str, str]:
    """Log the checkpoint as an image-serving pyfunc into its trial's MLflow run
    (:func:`log_image_model`: weights and threshold, no
    optimizer state), register it as ``pouta-<dataset>-<category>`` and point ``challenger``
    at the new version."""
    from pouta_core.checkpoint import load_model, require_calibrated
    from pouta_core.serving import decision_line

    run_id = cb.run_id_for(category, trial_id)
    client = cb.client
    done = client.get_run(run_id).data.tags.get("pouta.registered_version")
    if done:   # a rerun of a finished experiment: registered already
        return registered_name(plan.data.dataset, category), done
    model, config, state = load_model(checkpoint, "cpu")
    require_calibrated(model, checkpoint)
    name = registered_name(plan.data.dataset, category)
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(plan.tracking_uri))
    with mlflow.start_run(run_id=run_id):
        info = log_image_model(state, registered_model_name=name)
    version = str(info.registered_model_version)
    client.set_tag(run_id, "pouta.registered_version", version)
    client.set_registered_model_alias(name, tracking.CHALLENGER, version)
    describe_version(client, name, version, category=category, fingerprint=cb.fingerprints.get(category, ""),
                     metrics=state.get("metrics", {}), searched=searched or {}, source=f"{kind} {plan.run_name}",
                     parent_run_id=cb.parent_run_id, selection=tracking.selection_tag(config.val_split), note=note,
                     decision=decision_line(state))
    tracking.finish(client, run_id)
    return name, version
