"""Declarative YAML search spaces over pouta_core.config keys, and their validation."""

from search_spaces.loader import Dimension, SearchSpace, SearchSpaceError, bundled, load

__all__ = ["Dimension", "SearchSpace", "SearchSpaceError", "bundled", "load"]
