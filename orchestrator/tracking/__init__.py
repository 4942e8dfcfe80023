"""MLflow tracking: where runs go, one parent run per command, one child run per
category-trial, the registry with aliases (``champion`` / ``challenger``; stages are not used).
This face only hands names on. The modules: :mod:`.client` (the store, runs found, opened,
finished; params and metrics: the names below), :mod:`.parent` (the command's parent run),
:mod:`.callback` (trials into child runs: :mod:`.records` written to the driver's :mod:`.journal`,
sent by :mod:`.outbox`), :mod:`.registry` (names,
aliases, the chosen weights registered), :mod:`.models` (weights by name), :mod:`.report`
(what a command found).
"""

from orchestrator.tracking.client import *  # noqa: F403  (client.__all__: the store and run helpers)
from orchestrator.tracking.client import __all__  # noqa: F401
