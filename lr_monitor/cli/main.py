"""The ``lr-monitor`` command: ``demo``, ``report`` and ``plot``.

* ``lr-monitor demo [--out DIR] [--epochs N] [--quick] [--seed N]`` trains a small MLP on
  scikit-learn's digits twice (a sensible and a too-high learning rate) with
  :class:`~lr_monitor.StepSizeMonitor` and :class:`~lr_monitor.DivergenceGuard` attached
  and prints what the guard caught (see :mod:`lr_monitor.cli.demo`).
* ``lr-monitor report LOGDIR [--json] [--prefix P] [--runs GLOB] [--loss-tag TAG]``
  summarises every run below ``LOGDIR``, reading one run at a time (see
  :mod:`lr_monitor.cli.report`).
* ``lr-monitor plot LOGDIR [-o FILE] [--per-run] [--prefix P] [--runs GLOB]
  [--loss-tag TAG] [--per-page N] [--max-files N] [--max-points N]`` draws the runs to
  PNG, a page of runs at a time (see :mod:`lr_monitor.cli.plot`).

Every option is checked before anything runs, with the project's one message format
naming the option as typed: ``--seed=-1 is invalid: must be an int in [0, 4294967295]``.
While ``report`` and ``plot`` read, what they skip (an unreadable file, a corrupt line or
record) is one ``lr-monitor <command>: warning: ...`` line on stderr each; names are
printed terminal-safe (:func:`lr_monitor.cli.report.terminal_safe`).

Exit codes: 0 on success (warnings included), 2 for a usage error, a bad option or a
run that cannot be read or written (one line on stderr naming the file or the option,
no traceback), 130 on Ctrl-C.
``report`` and ``plot`` only read the log files; only ``demo`` imports Lightning.

Example:
    >>> main(["report", "/nonexistent/logs"])
    2
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lr_monitor._validation import invalid

if TYPE_CHECKING:
    from lr_monitor.cli.report import RunSource

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "MAX_EPOCHS", "MAX_FILES",
           "MAX_PER_PAGE", "MAX_POINTS", "MAX_SEED", "MIN_POINTS", "build_parser", "main"]

#: Success.
EXIT_OK = 0
#: Usage error, or a file that cannot be read or written.
EXIT_ERROR = 2
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

_PROG = "lr-monitor"


class _CliError(Exception):
    """An error to report as one line on stderr with :data:`EXIT_ERROR`."""


class _UsageError(Exception):
    """argparse's complaint about the command line, to print as one line."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``main`` prints it), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)


class _Store(argparse.Action):
    """Store the value and the option string the user typed (``-o`` or ``--output``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


#: Largest ``--seed``: seeds are unsigned 32-bit for numpy.
MAX_SEED = 2**32 - 1
#: Largest ``--epochs`` (23 optimizer steps each).
MAX_EPOCHS = 10_000
#: Largest ``plot --per-page``: a figure of 24 columns is about 14,400 pixels wide.
MAX_PER_PAGE = 24
#: Largest ``plot --max-files``.
MAX_FILES = 100_000
#: Smallest and largest ``plot --max-points``.
MIN_POINTS = 10
MAX_POINTS = 10_000_000
_SHOWN = 100  # characters of a bad value shown in a message, at each end


def _shown(text: str) -> str:
    """A value for a message: its middle left out when it is very long."""
    return text if len(text) <= 2 * _SHOWN else f"{text[:_SHOWN]}…{text[-_SHOWN:]}"


def _int_option(option: str, text: str, low: int, high: int) -> int:
    """``int(text)`` if it is an integer in ``[low, high]``, else the one-line error."""
    allowed = f"an int in [{low}, {high}]"
    try:
        value = int(text, 10)
    except ValueError:
        raise invalid(option, _shown(text), allowed) from None
    if not low <= value <= high:
        raise invalid(option, value if len(text) <= 2 * _SHOWN else _shown(text), allowed)
    return value


def _path_option(option: str, text: str, what: str) -> str:
    """``text`` if it is a non-empty path without NUL bytes, else the one-line error."""
    if not text:
        raise invalid(option, text, what)
    if "\0" in text:
        raise invalid(option, _shown(text), f"{what} (without NUL bytes)")
    return text


def _unwritable(directory: str) -> str | None:
    """Why files cannot be created in ``directory`` (created if missing), or ``None``."""
    probe = directory
    while True:
        try:
            mode = os.stat(probe).st_mode
        except (FileNotFoundError, NotADirectoryError):  # look at the parent
            parent = os.path.dirname(os.path.normpath(probe))
            if parent in ("", probe):
                return None
            probe = parent
            continue
        except OSError as exc:  # name too long, a symbolic-link loop, permission denied
            return f"{_shown(probe)}: {exc.strerror or exc}"
        break
    if not stat.S_ISDIR(mode):
        from lr_monitor.eventlog import file_kind

        return f"{_shown(probe)} is {file_kind(mode)}, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{_shown(probe)} is not writable"
    return None


def _check_out_dir(option: str, text: str) -> str:
    """``--out``: a directory that exists and is writable, or can be created."""
    what = "a directory to write the runs to"
    _path_option(option, text, what)
    problem = _unwritable(text)
    if problem is not None:
        raise invalid(option, _shown(text), f"{what} ({problem})")
    return text


def _check_png(option: str, text: str, per_run: bool) -> str:
    """``-o/--output``: a new or writable ``.png`` file in a writable directory."""
    what = "a .png file to write"
    _path_option(option, text, what)
    if Path(text).suffix.lower() != ".png":
        raise invalid(option, _shown(text), what + " (ending in .png)")
    if not per_run:  # with --per-run, FILE is only the pattern of the names
        try:
            mode = os.stat(text).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise invalid(option, _shown(text), f"{what} ({exc.strerror or exc})") from None
        if mode is not None and not stat.S_ISREG(mode):
            from lr_monitor.eventlog import file_kind

            raise invalid(option, _shown(text), f"{what} (it is {file_kind(mode)})")
        if mode is not None and not os.access(text, os.W_OK):
            raise invalid(option, _shown(text), f"{what} (it is not writable)")
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        raise invalid(option, _shown(text), f"{what} in a directory that exists "
                                            f"({_shown(parent)} does not)")
    problem = _unwritable(parent)
    if problem is not None:
        raise invalid(option, _shown(text), f"{what} ({problem})")
    return text


def _check_prefix(text: str) -> str:
    if not text or text.startswith("/") or "\0" in text:
        raise invalid("--prefix", _shown(text), "a non-empty string not starting with '/'")
    return text


def _check_names(option: str, texts: list[str] | None, what: str) -> list[str] | None:
    """Each of a repeatable option's values: non-empty, without NUL bytes."""
    for text in texts or ():
        if not text or "\0" in text:
            raise invalid(option, _shown(text), f"{what} (non-empty, without NUL bytes)")
    return texts


def _check_args(args: argparse.Namespace) -> None:
    """Check every option of ``args`` (in place: ints parsed); ValueError names the option."""
    if args.command == "demo":
        args.out = _check_out_dir(getattr(args, "out_flag", None) or "--out", args.out)
        if args.epochs is not None:
            args.epochs = _int_option("--epochs", args.epochs, 1, MAX_EPOCHS)
        args.seed = _int_option("--seed", args.seed, 0, MAX_SEED)
        return
    _path_option("LOGDIR", args.logdir, "a log directory, run directory or event file")
    args.prefix = _check_prefix(args.prefix)
    args.runs = _check_names("--runs", args.runs, "a glob matched against run names")
    args.loss_tags = _check_names("--loss-tag", args.loss_tags, "a scalar tag")
    if args.command == "plot":
        flag = getattr(args, "output_flag", None) or "--output"
        args.output = _check_png(flag, args.output, args.per_run)
        if args.per_page is not None:
            args.per_page = _int_option("--per-page", args.per_page, 1, MAX_PER_PAGE)
            if args.per_run:
                raise invalid("--per-page", args.per_page,
                              "left out with --per-run (one run per PNG)")
        args.max_files = _int_option("--max-files", args.max_files, 1, MAX_FILES)
        args.max_points = _int_option("--max-points", args.max_points, MIN_POINTS, MAX_POINTS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lr-monitor`` with its three subcommands.

    Example:
        >>> args = build_parser().parse_args(["plot", "logs", "-o", "x.png"])
        >>> args.command, args.logdir, args.output, args.per_run
        ('plot', 'logs', 'x.png', False)
    """
    from lr_monitor import __version__
    from lr_monitor.cli.demo import DEFAULT_EPOCHS, DEFAULT_OUT
    from lr_monitor.cli.plot import DEFAULT_MAX_FILES, DEFAULT_MAX_POINTS, DEFAULT_PER_PAGE

    parser = _Parser(
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
    demo.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", action=_Store,
                      help="log directory (default: %(default)s)")
    demo.add_argument("--epochs", default=None, metavar="N",
                      help=f"epochs per run, 1 to {MAX_EPOCHS} (default: {DEFAULT_EPOCHS}; "
                           "2 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a few steps only (8 batches per epoch), for tests")
    demo.add_argument("--seed", default="0", metavar="N",
                      help=f"random seed, 0 to {MAX_SEED} (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide Lightning's progress bar")

    report = sub.add_parser(
        "report",
        help="summarise the runs under a log directory",
        description="Print a table per run found below LOGDIR (any directory holding "
                    "TensorBoard event files): steps, what the loss did (start, best, "
                    "last), the update ratio, the guard's actions and their steps, the "
                    "learning rate (first, peak, min, last).",
    )
    _add_run_arguments(report)
    report.add_argument("--json", action="store_true",
                        help="print machine-readable JSON instead of tables")

    plot = sub.add_parser(
        "plot",
        help="draw the runs under a log directory to PNG",
        description="Figures of up to --per-page runs, one column per run (or one PNG per "
                    "run with --per-run): loss with the guard's events, learning rate and "
                    "guard LR scale, effective-lr p05-p95 band and p50, update ratio, "
                    "gradient norm. More runs go to numbered pages (FILE's stem + "
                    "'-p01.png', ...), at most --max-files files.",
    )
    _add_run_arguments(plot)
    plot.add_argument("-o", "--output", default="run.png", metavar="FILE", action=_Store,
                      help="PNG to write (default: %(default)s)")
    plot.add_argument("--per-run", action="store_true",
                      help="write one PNG per run, FILE's stem + '-<run>.png'")
    plot.add_argument("--per-page", default=None, metavar="N",
                      help=f"runs per figure, 1 to {MAX_PER_PAGE} (default: "
                           f"{DEFAULT_PER_PAGE}); more runs go to numbered pages")
    plot.add_argument("--max-files", default=str(DEFAULT_MAX_FILES), metavar="N",
                      help=f"PNG files written at most, 1 to {MAX_FILES} (default: "
                           "%(default)s); the runs beyond are left out with a warning")
    plot.add_argument("--max-points", default=str(DEFAULT_MAX_POINTS), metavar="N",
                      help=f"points drawn per line at most, {MIN_POINTS} to {MAX_POINTS} "
                           "(default: %(default)s; each stretch's min and max are kept)")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``report`` and ``plot`` both read: LOGDIR and the monitor's tag prefix."""
    from lr_monitor.tags import DEFAULT_PREFIX

    parser.add_argument("logdir", metavar="LOGDIR",
                        help="log directory, run directory or event file")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="StepSizeMonitor tag prefix (default: %(default)s)")
    parser.add_argument("--runs", action="append", default=None, metavar="GLOB",
                        help="only the runs whose name (relative to LOGDIR) matches this "
                             "glob; repeat for more (default: every run)")
    parser.add_argument("--loss-tag", action="append", default=None, metavar="TAG",
                        dest="loss_tags",
                        help="the training-loss tag; repeat for more (default: found: "
                             "train/loss, train_loss, loss, ..., else every tag named "
                             "*loss* that is not a validation one)")


def _selected_runs(args: argparse.Namespace) -> list[RunSource]:
    """The runs below LOGDIR that ``--runs`` selects (all without it), not read yet."""
    from lr_monitor.cli.report import display_path, find_runs, select_runs

    found = find_runs(args.logdir)
    chosen, unmatched = select_runs(found, args.runs)
    if unmatched:
        examples = ", ".join(repr(r.name) for r in found[:3])
        more = ", …" if len(found) > 3 else ""
        raise _CliError(str(invalid(
            "--runs", _shown(unmatched[0]),
            f"a glob matching the name of a run below {display_path(args.logdir)} "
            f"({len(found)} run{'s' if len(found) != 1 else ''}: {examples}{more})")))
    return chosen


def _cmd_report(args: argparse.Namespace) -> int:
    from lr_monitor.cli.report import (
        build_report,
        no_readable_runs,
        render_reports,
        reports_to_json,
    )

    sources = _selected_runs(args)
    read = 0

    def reports() -> Iterator[dict[str, Any]]:  # one run in memory at a time
        nonlocal read
        for source in sources:
            run = source.load()
            if run.event_files:
                read += 1
                yield build_report(run, prefix=args.prefix, loss_tags=args.loss_tags)

    if args.json:
        collected = list(reports())
        if not read:
            raise no_readable_runs(args.logdir, sum(len(s.files) for s in sources))
        sys.stdout.write(reports_to_json(collected, args.logdir) + "\n")
    else:
        render_reports(reports())
        if not read:
            raise no_readable_runs(args.logdir, sum(len(s.files) for s in sources))
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from lr_monitor.cli.report import display_path, no_readable_runs

    try:
        from lr_monitor.cli.plot import DEFAULT_PER_PAGE, plot_runs
    except ImportError as exc:  # matplotlib is an optional dependency
        raise _CliError(f"plot needs matplotlib ({exc}); pip install 'lr-monitor[cli]'") from exc
    output = Path(args.output)
    sources = _selected_runs(args)
    try:
        written = plot_runs(sources, output, per_run=args.per_run, prefix=args.prefix,
                            per_page=args.per_page or DEFAULT_PER_PAGE,
                            max_files=args.max_files, max_points=args.max_points,
                            loss_tags=args.loss_tags)
    except OSError as exc:
        where = display_path(exc.filename or output)
        raise _CliError(f"{where}: cannot write ({exc.strerror or exc})") from exc
    if not written:
        raise no_readable_runs(args.logdir, sum(len(s.files) for s in sources))
    for path in written:
        print(f"wrote {display_path(path)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from lr_monitor.cli.report import display_path

    try:
        from lr_monitor.cli.demo import print_summary, run_demo

        result = run_demo(args.out, epochs=args.epochs, quick=args.quick, seed=args.seed,
                          progress_bar=not args.no_progress)
    except ImportError as exc:
        raise _CliError(f"the demo needs Lightning, scikit-learn and the lr_monitor "
                        f"callbacks: {exc}") from exc
    except OSError as exc:  # e.g. the disk filled up, or --out changed under us
        where = display_path(exc.filename or args.out)
        raise _CliError(f"{where}: cannot write ({exc.strerror or exc})") from exc
    print_summary(result)
    return EXIT_OK


class _WarningLine(logging.Formatter):
    """``lr-monitor report: warning: <message>``, one terminal-safe line."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        from lr_monitor.cli.report import terminal_safe

        return f"{self.prefix}: warning: {terminal_safe(' '.join(record.getMessage().split()))}"


@contextmanager
def _warnings_on_stderr(prefix: str) -> Iterator[None]:
    """Print what the readers skip (``lr_monitor`` warnings) as lines on stderr."""
    logger = logging.getLogger("lr_monitor")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WarningLine(prefix))
    handler.setLevel(logging.WARNING)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lr-monitor`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit code: :data:`EXIT_OK`, :data:`EXIT_ERROR` or :data:`EXIT_INTERRUPTED`
        (``--help`` and ``--version`` return 0).
    """
    from lr_monitor.cli.report import ReportError, terminal_safe

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(args)
    except SystemExit as exc:  # argparse exits on --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except _UsageError as exc:
        message = terminal_safe(" ".join(str(exc).split()))
        print(f"{exc.prog}: error: {message} (see {exc.prog} --help)", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # an option's value, in the one message format
        message = terminal_safe(" ".join(str(exc).split()))
        print(f"{_PROG} {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    handler = {"demo": _cmd_demo, "report": _cmd_report, "plot": _cmd_plot}[args.command]
    try:
        if args.command == "demo":  # the guard's own log lines stay as they are
            return handler(args)
        with _warnings_on_stderr(f"{_PROG} {args.command}"):
            return handler(args)
    except (ReportError, _CliError) as exc:
        message = terminal_safe(" ".join(str(exc).split()))
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
