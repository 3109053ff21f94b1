"""``python -m fictures_ai`` runs the CLI."""

import sys

from fictures_ai.cli import main

sys.exit(main())
