"""The ``lr-monitor`` command: ``demo``, ``report`` and ``plot``.

* ``lr-monitor demo [--out DIR] [--epochs N] [--quick] [--seed N]`` trains a small MLP on
  scikit-learn's digits twice (a sensible and a too-high learning rate) with
  :class:`~lr_monitor.StepSizeMonitor` and :class:`~lr_monitor.DivergenceGuard` attached
  and prints what the guard caught (see :mod:`lr_monitor.cli.demo`).
* ``lr-monitor report LOGDIR [--json] [--prefix P]`` summarises every run below
  ``LOGDIR`` (see :mod:`lr_monitor.cli.report`).
* ``lr-monitor plot LOGDIR [-o FILE] [--per-run] [--prefix P]`` draws the runs to PNG
  (see :mod:`lr_monitor.cli.plot`).

Exit codes: 0 on success, 2 for a usage error or a file that cannot be read or
written (one line on stderr naming the file, no traceback), 130 on Ctrl-C.
``report`` and ``plot`` only read the log files; only ``demo`` imports Lightning.

Example:
    >>> main(["report", "/nonexistent/logs"])
    2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]

#: Success.
EXIT_OK = 0
#: Usage error, or a file that cannot be read or written.
EXIT_ERROR = 2
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

_PROG = "lr-monitor"


class _CliError(Exception):
    """An error to report as one line on stderr with :data:`EXIT_ERROR`."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lr-monitor`` with its three subcommands.

    Example:
        >>> args = build_parser().parse_args(["plot", "logs", "-o", "x.png"])
        >>> args.command, args.logdir, args.output, args.per_run
        ('plot', 'logs', 'x.png', False)
    """
    from lr_monitor import __version__
    from lr_monitor.cli.demo import DEFAULT_EPOCHS, DEFAULT_OUT

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="See the step each weight takes under adaptive optimizers, and what "
                    "the divergence guard did about it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a small MLP at a good and a too-high learning rate and show what the "
             "monitor and the guard saw",
        description="Train a 64-128-10 MLP on scikit-learn's digits twice (Adam lr=1e-3 "
                    "and lr=1.0) with StepSizeMonitor and DivergenceGuard, then print what "
                    "was detected, where the logs are and how to open them.",
    )
    demo.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help="log directory (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                      help=f"epochs per run (default: {DEFAULT_EPOCHS}; 2 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a few steps only (8 batches per epoch), for tests")
    demo.add_argument("--seed", type=int, default=0, metavar="N",
                      help="random seed (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide Lightning's progress bar")

    report = sub.add_parser(
        "report",
        help="summarise the runs under a log directory",
        description="Print a table per run found below LOGDIR (any directory holding "
                    "TensorBoard event files): steps, final metrics, the guard's actions "
                    "and their steps, headline step-size statistics.",
    )
    _add_run_arguments(report)
    report.add_argument("--json", action="store_true",
                        help="print machine-readable JSON instead of tables")

    plot = sub.add_parser(
        "plot",
        help="draw the runs under a log directory to PNG",
        description="One figure, one column per run (or one PNG per run with --per-run): "
                    "loss with the guard's events, learning rate and guard LR scale, "
                    "effective-lr p05-p95 band and p50, update ratio, gradient norm.",
    )
    _add_run_arguments(plot)
    plot.add_argument("-o", "--output", default="run.png", metavar="FILE",
                      help="PNG to write (default: %(default)s)")
    plot.add_argument("--per-run", action="store_true",
                      help="write one PNG per run, FILE's stem + '-<run>.png'")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``report`` and ``plot`` both read: LOGDIR and the monitor's tag prefix."""
    from lr_monitor.tags import DEFAULT_PREFIX

    parser.add_argument("logdir", metavar="LOGDIR",
                        help="log directory, run directory or event file")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="StepSizeMonitor tag prefix (default: %(default)s)")


def _cmd_report(args: argparse.Namespace) -> int:
    from lr_monitor.cli.report import build_report, load_runs, render_reports, reports_to_json

    runs = load_runs(args.logdir)
    reports = [build_report(run, prefix=args.prefix) for run in runs]
    if args.json:
        sys.stdout.write(reports_to_json(reports, args.logdir) + "\n")
    else:
        render_reports(reports)
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from lr_monitor.cli.report import load_runs

    try:
        from lr_monitor.cli.plot import plot_runs
    except ImportError as exc:  # matplotlib is an optional dependency
        raise _CliError(f"plot needs matplotlib ({exc}); pip install 'lr-monitor[cli]'") from exc
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise _CliError(f"{output}: the output must be a .png file")
    if not output.parent.is_dir():
        raise _CliError(f"{output}: directory {output.parent} does not exist")
    runs = load_runs(args.logdir)
    try:
        written = plot_runs(runs, output, per_run=args.per_run, prefix=args.prefix)
    except OSError as exc:
        raise _CliError(f"{exc.filename or output}: cannot write ({exc.strerror or exc})") \
            from exc
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from lr_monitor.cli.demo import print_summary, run_demo

        result = run_demo(args.out, epochs=args.epochs, quick=args.quick, seed=args.seed,
                          progress_bar=not args.no_progress)
    except ImportError as exc:
        raise _CliError(f"the demo needs Lightning, scikit-learn and the lr_monitor "
                        f"callbacks: {exc}") from exc
    print_summary(result)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lr-monitor`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit code: :data:`EXIT_OK`, :data:`EXIT_ERROR` or :data:`EXIT_INTERRUPTED`
        (``--help`` and ``--version`` return 0).
    """
    from lr_monitor.cli.report import ReportError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    handler = {"demo": _cmd_demo, "report": _cmd_report, "plot": _cmd_plot}[args.command]
    try:
        return handler(args)
    except (ReportError, _CliError) as exc:
        message = " ".join(str(exc).split())
        print(f"{_PROG} {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `lr-monitor report logs | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
