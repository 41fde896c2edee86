"""``python -m orchestrator.launch.slurm`` (see ``orchestrator.launch.slurm.cli``)."""

import sys

from orchestrator.launch.slurm.cli import main

sys.exit(main())
