"""The ``pouta`` command line, a module per command group: :mod:`.local` (one machine),
:mod:`.experiments` (on Ray, tracked in MLflow), :mod:`.bench`; the argument groups they share
(:mod:`.args`), what they print (:mod:`.console`) and the entry point (:mod:`.main`). Heavy
imports (torch models, Ray, MLflow) happen inside the subcommands."""

from orchestrator.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
