"""``python -m orchestrator.cli``: the ``pouta`` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
