"""``python -m lr_monitor.cli`` runs the ``lr-monitor`` command."""

import sys

from lr_monitor.cli.main import main

sys.exit(main())
