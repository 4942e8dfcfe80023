"""POUTA and its ablations (paper §3, Table 4) as one PyTorch module."""

from pouta_core.model.pouta import AnomalyDetector, PoutaOutput, build_model
from pouta_core.model.scoring import anomaly_map, image_score

__all__ = ["AnomalyDetector", "PoutaOutput", "anomaly_map", "build_model", "image_score"]
