"""The file MLflow logs as the registered model's code ("models from code"): loading a version
runs it, so nothing is unpickled. It needs the ``pouta`` package where the model is served."""

import mlflow

from orchestrator.tracking.serving import PoutaImageModel

mlflow.models.set_model(PoutaImageModel())
