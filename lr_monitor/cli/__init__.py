"""The ``lr-monitor`` command and what it runs; files in, text and pictures out.

* :mod:`~lr_monitor.cli.main` — argument parsing and exit codes (``lr-monitor``).
* :mod:`~lr_monitor.cli.report` — finds the runs below a directory, reads them and
  prints reports.
* :mod:`~lr_monitor.cli.tfevents` — reads TensorBoard event files (framing, CRC, scalars).
* :mod:`~lr_monitor.cli.plot` — draws what :mod:`~lr_monitor.cli.report` read.
* :mod:`~lr_monitor.cli.demo` — the one application here: trains two small runs with the
  callbacks attached (imports Lightning when called).
"""

from __future__ import annotations

from lr_monitor.cli.main import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, build_parser, main

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]
