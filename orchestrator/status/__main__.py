"""``python -m orchestrator.status RUN_DIR``: see ``orchestrator.status.report``."""

import sys

from orchestrator.status.report import main

sys.exit(main())
