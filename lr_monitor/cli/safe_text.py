r"""Names from files, made safe to print: run names, tags, file names, event fields.

Anything read from a log directory may hold characters a terminal acts on (ANSI escapes,
``\r``, bidi overrides) or bytes that are not UTF-8. ``report``, ``plot`` and the
event-file reader (:mod:`lr_monitor.cli.tfevents`) print every such name through
:func:`terminal_safe`, and every path in a message through :func:`display_path`.

Example:
    >>> print(display_path("runs/a\x1b[2J"))
    runs/a\x1b[2J
"""

from __future__ import annotations

import os

__all__ = ["display_path", "terminal_safe"]


def terminal_safe(text: str) -> str:
    r"""``text`` with every character a terminal could act on escaped, Python-style.

    Control characters (ANSI escapes, ``\r``, BEL, ...), format characters (bidi
    overrides, zero-width ones), line and paragraph separators and other unprintable
    characters become ``\x1b``, ``\r``, ``\u202e`` and so on; the bytes of a file name
    that is not UTF-8 (surrogate escapes) become ``\xff``. Printable text, spaces
    included, is unchanged. ``report`` and ``plot`` print every name (run, tag, file,
    event field) through this.

    Args:
        text: A name or a line to print.

    Returns:
        The text with every unprintable character escaped.

    Example:
        >>> print(terminal_safe("run\x1b[31m\r\u202e" + b"\xff".decode("utf-8", "surrogateescape")))
        run\x1b[31m\r\u202e\xff
        >>> terminal_safe("healthy-lr1e-3/version_0 ×2")
        'healthy-lr1e-3/version_0 ×2'
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (os.fsdecode)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


#: Paths longer than this are shortened in messages (the middle left out).
_MAX_SHOWN_PATH = 160


def display_path(path: str | os.PathLike[str]) -> str:
    r"""A path for a message: terminal-safe, and its middle left out when it is very long.

    Args:
        path: The path.

    Returns:
        :func:`terminal_safe` of the path; past 160 characters, its first and last 70
        with ``…`` between and the length in parentheses.

    Example:
        >>> display_path("runs/a\x1b[2J")
        'runs/a\\x1b[2J'
        >>> display_path("/tmp/" + "x" * 5000)[-22:]
        'xxx (5,005 characters)'
    """
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    if len(text) > _MAX_SHOWN_PATH:
        keep = _MAX_SHOWN_PATH // 2 - 10
        text = f"{text[:keep]}…{text[-keep:]} ({len(text):,} characters)"
    return terminal_safe(text)
