"""Everything distributed and everything tracked around :mod:`pouta_core`, in rooms that follow
a command's data one way:

- :mod:`orchestrator.cli`: the ``pouta`` command line (parser, argument groups, console);
- :mod:`orchestrator.commands`: ``launch``, ``sweep``, ``retrain`` and the orchestration bench,
  each taking a :class:`~orchestrator.plan.Plan` and returning a summary;
- :mod:`orchestrator.plan` (what an experiment is) and :mod:`orchestrator.spec` (what a trial
  is: one frozen object from the command line to the worker);
- :mod:`orchestrator.execution`: Ray (the cluster, the Tune experiment, trials and workers,
  scheduling, bounded waits, interrupts, progress, results);
- :mod:`orchestrator.tracking`: MLflow (runs, the parent run, the trial callback, the registry,
  weights by name, the report).
"""
