"""Synthetic anomalies for training (paper §3.1)."""

from pouta_core.synthesis.perlin import perlin_mask, perlin_noise
from pouta_core.synthesis.sources import TextureFolder, anomaly_source
from pouta_core.synthesis.synthesize import AnomalySynthesizer, Synthesized, foreground_mask

__all__ = ["AnomalySynthesizer", "Synthesized", "TextureFolder", "anomaly_source", "foreground_mask",
           "perlin_mask", "perlin_noise"]
