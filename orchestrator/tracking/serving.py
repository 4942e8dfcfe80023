"""The registered model as MLflow serves it: encoded images in, per image a score, a decision,
the threshold and an anomaly map out (:class:`PoutaImageModel`, an MLflow pyfunc over the
POUTA checkpoint it carries as an artifact).

Request (any of MLflow's input formats; a column ``image`` of base64 PNG/JPEG/TIFF/BMP/WebP
strings of any size)::

    {"inputs": {"image": ["iVBORw0KGgo..."]}, "params": {"map_size": 0}}

Response: ``{"predictions": [{"score", "anomalous", "threshold", "threshold_policy", "map", "error"}, ...]}``,
one entry per image in order (:mod:`pouta_core.serving`). Params: ``threshold`` (default:
the one stored at training time, picked on validation), ``map_size`` (default: the map at
the input's size; 0: no map; N: longer side N pixels).

*Decision* (issue 32): one model per registered version, the pyfunc over the inference
checkpoint (weights, config, threshold; no optimizer state), so a version costs its weights
and a few kB in MLflow (issue 28), ``pouta predict --model models:/...`` reads the same
``checkpoint.pt`` (:mod:`.models`), and the raw tensor model is ``pouta export --model
models:/...`` (TorchScript or ONNX, input (B, 3, S, S) in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

ARTIFACT = "model"            # the run's logged model, registered
CHECKPOINT_KEY = "checkpoint"  # the pyfunc's artifact: pouta_core.checkpoint.CHECKPOINT
INPUT_COLUMN = "image"
# Logged as code, not pickled (MLflow's "models from code"): it builds a PoutaImageModel.
MODEL_CODE = str(Path(__file__).with_name("served_model.py"))
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
    params=ParamSchema([ParamSpec("threshold", "double", None), ParamSpec("map_size", "long", None)]))


def _images(model_input: Any) -> list:
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"expected a column '{INPUT_COLUMN}' of base64-encoded images, "
                             f"got columns {list(model_input.columns)}")
        return model_input[INPUT_COLUMN].tolist()
    if isinstance(model_input, dict):
        return list(model_input[INPUT_COLUMN])
    return list(model_input)


class PoutaImageModel(mlflow.pyfunc.PythonModel):
    """Encoded images -> per image score, decision, threshold, map, error."""

    def load_context(self, context) -> None:
        from pouta_core.serving import ImageScorer

        self.scorer = ImageScorer(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
        params = params or {}
        return self.scorer.score(_images(model_input), threshold=params.get("threshold"),
                                 map_size=params.get("map_size"))
