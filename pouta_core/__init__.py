"""POUTA core: data, synthesis, model, losses, training and metrics in plain PyTorch.

This package never imports Ray, MLflow or Optuna; ``orchestrator`` wraps it.
"""

from pouta_core.config import Config, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "__version__"]
