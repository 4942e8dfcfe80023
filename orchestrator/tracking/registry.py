"""The registry: the chosen trial's weights logged with ``mlflow.pytorch.log_model``, registered
as ``pouta-<dataset>-<category>`` with the alias ``challenger``, and a model version page that
says what it is and why it was chosen."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.plan import SUMMARY_METRICS, Plan
from orchestrator.spec import SAMPLED, decode_sampled, short
from orchestrator.tracking.callback import MlflowTrialCallback


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
        sampled = best["config"].get(SAMPLED, {})
        name, version = register_best(plan, cb, category, best["trial_id"], best["checkpoint"],
                                      searched=decode_sampled(sampled), kind=kind)
        summary[category] = {**entry, "best": {k: best.get(k) for k in ["trial_id", "epoch", *keys]},
                             "config": cb.spec.config_for(category, sampled).to_dict(),   # what it trained with
                             "registered_model": name, "version": version}
    return summary


def model_requirements() -> list[str]:
    """What loading a logged POUTA model needs: torch, numpy, cloudpickle (MLflow pickles the
    module with it) at this process's versions; the ``pouta`` package itself must be
    installed where the model is loaded (it is not on PyPI)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "cloudpickle")]


def describe_version(client, name: str, version: str, *, category: str, fingerprint: str,
                     metrics: dict[str, float], searched: dict[str, Any], source: str, parent_run_id: str,
                     selection: str) -> None:
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
    description = (f"POUTA model for **{category}**, chosen by {source} on the **{selection}** split "
                   f"(parent run `{parent_run_id}`).\n\n| metric | validation (chosen on) | test (reported) |\n"
                   f"|---|---|---|\n{rows}\n\nSearched values: {values}.\n\n"
                   f"Training data fingerprint: `{fingerprint[:16]}`.\n\nThis model returns anomaly maps; "
                   f"`score_model` in the same run returns the image scores.")
    client.update_model_version(name, version, description=description)


def log_weights(client, run_id: str, state: dict[str, Any]) -> None:
    """The registered version's weights as the run's ``checkpoint/checkpoint.pt`` (what
    ``--model models:/...`` loads): the model, its config, threshold and metrics, not the
    optimizer state only a resume needs (:func:`pouta_core.checkpoint.inference_state`)."""
    import tempfile

    from pouta_core import checkpoint as ckpt

    with tempfile.TemporaryDirectory(prefix="pouta-weights-") as tmp:
        ckpt.save_checkpoint(Path(tmp), ckpt.inference_state(state))
        client.log_artifact(run_id, str(Path(tmp) / ckpt.CHECKPOINT), artifact_path="checkpoint")


def register_best(plan: Plan, cb: MlflowTrialCallback, category: str, trial_id: str, checkpoint: str,
                  searched: dict[str, Any] | None = None, kind: str = "launch") -> tuple[str, str]:
    """Log the checkpoint's model into its trial's MLflow run with ``mlflow.pytorch.log_model``
    (``model``: anomaly maps; ``score_model``: image scores), register ``model`` as
    ``pouta-<dataset>-<category>`` and point ``challenger`` at the new version."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from pouta_core.checkpoint import load_model, require_calibrated
    from pouta_core.inference import MapModel, ScoreModel

    run_id = cb.run_id_for(category, trial_id)
    client = cb.client
    done = client.get_run(run_id).data.tags.get("pouta.registered_version")
    if done:   # a rerun of a finished experiment: registered already
        return registered_name(plan.data.dataset, category), done
    model, config, state = load_model(checkpoint, "cpu")
    require_calibrated(model, checkpoint)
    # Two images: MLflow's torch.export fixes a batch dimension of size 1 in the example.
    example = np.random.default_rng(0).random((2, 3, config.image_size, config.image_size), dtype=np.float32)
    name = registered_name(plan.data.dataset, category)
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(plan.tracking_uri))
    with mlflow.start_run(run_id=run_id):
        # "model" (registered) serves anomaly maps, "score_model" beside it image scores: MLflow's
        # default format (torch.export) has one tensor output and no parameters.
        # Requirements named, not inferred: MLflow's inference re-imports the model in a
        # subprocess (about 10 s per model here, serially after the sweep).
        for artifact, module in (("score_model", ScoreModel(model)), ("model", MapModel(model))):
            with torch.inference_mode():
                output = module.eval()(torch.from_numpy(example)).numpy()
            info = mlflow.pytorch.log_model(module, name=artifact, signature=infer_signature(example, output),
                                            input_example=example, pip_requirements=model_requirements(),
                                            registered_model_name=name if artifact == "model" else None)
        log_weights(client, run_id, state)
    version = str(info.registered_model_version)
    client.set_tag(run_id, "pouta.registered_version", version)
    client.set_registered_model_alias(name, tracking.CHALLENGER, version)
    describe_version(client, name, version, category=category, fingerprint=cb.fingerprints.get(category, ""),
                     metrics=state.get("metrics", {}), searched=searched or {}, source=f"{kind} {plan.run_name}",
                     parent_run_id=cb.parent_run_id, selection=tracking.selection_tag(config.val_split))
    tracking.finish(client, run_id)
    return name, version
