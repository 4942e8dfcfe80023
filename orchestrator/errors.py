"""Errors the command line turns into one line and an exit code (no Ray or MLflow imports
here, so ``pouta train`` and ``pouta predict`` stay light)."""


class ClusterStalled(RuntimeError):
    """The trials' resource demand stayed unmet (or can never be met); the message says what
    is asked and what the cluster has. Exit code 3; the state is kept for a rerun."""


class TrackingIncomplete(RuntimeError):
    """MLflow stayed unreachable past the end of the trials: the message says how many records
    were not logged and where Ray's results are. Exit code 4; nothing was registered."""
