"""Errors the command line turns into one line and an exit code (no Ray or MLflow imports
here, so ``pouta train`` and ``pouta predict`` stay light)."""


# The exit code of a command whose every step ran but some trial errored (or, for retrain, a
# category failed): the other trials' results are kept, chosen from and registered.
EXIT_TRIALS_FAILED = 5


class ClusterStalled(RuntimeError):
    """The trials' resource demand stayed unmet (or can never be met); the message says what
    is asked and what the cluster has. Exit code 3; the state is kept for a rerun."""


class TrackingIncomplete(RuntimeError):
    """MLflow stayed unreachable past the end of the trials: the message says how many records
    were not logged and where Ray's results are. Exit code 4; nothing was registered."""
