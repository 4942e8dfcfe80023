"""The commands on Ray, tracked in MLflow: :mod:`.launch` (every category once), :mod:`.sweep`
(one Optuna study per category), :mod:`.retrain` (changed categories, promoted only when
better), :mod:`.bench` (what the orchestration costs) and :mod:`.peers` (peers timed in their
own environments). Each takes a :class:`~orchestrator.plan.Plan` and returns a summary."""
