"""Argument checks with one message format, naming the argument the user typed.

Every public constructor validates its arguments with these functions, so a bad value
fails at once with ``<argument>=<value> is invalid: must be <what is allowed>``. A
class that passes its arguments on to another (the guard to :class:`~lr_monitor.LRCut`)
checks them first under the name the user typed (``lr_factor``, not ``factor``).

Example:
    >>> check_int("cooldown", 3, minimum=0)
    3
    >>> check_real("lr_factor", 2.0, low=0.0, high=1.0)
    Traceback (most recent call last):
    ...
    ValueError: lr_factor=2.0 is invalid: must be a number in (0, 1)
    >>> check_bool("watch_grad_norm", "False")
    Traceback (most recent call last):
    ...
    ValueError: watch_grad_norm='False' is invalid: must be True or False
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HTTP_SCHEMES",
    "PORT_RANGE",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_http_url",
    "check_int",
    "check_path",
    "check_real",
    "check_regex",
    "check_str",
    "invalid",
]


def invalid(arg: str, value: Any, allowed: str) -> ValueError:
    """The project's one error message: ``<arg>=<value> is invalid: must be <allowed>``."""
    return ValueError(f"{arg}={value!r} is invalid: must be {allowed}")


def check_int(arg: str, value: Any, minimum: int, *, allow_none: bool = False) -> Any:
    """``value`` if it is an int ``>= minimum`` (or ``None`` when allowed).

    Raises:
        ValueError: otherwise (``bool`` is not an int here).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(arg, value, f"an int >= {minimum}" + (" or None" if allow_none else ""))
    return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def check_real(arg: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
               low_closed: bool = False, high_closed: bool = False,
               allow_none: bool = False) -> Any:
    """``float(value)`` if it is a finite real number in the given interval.

    Args:
        arg: The argument's name as the user typed it.
        value: The value to check.
        low: Lower end of the interval.
        high: Upper end of the interval.
        low_closed: Whether ``low`` itself is allowed.
        high_closed: Whether ``high`` itself is allowed.
        allow_none: Whether ``None`` is allowed (and returned as is).

    Raises:
        ValueError: for a non-number, ``bool``, NaN, infinity or a value outside.
    """
    if value is None and allow_none:
        return None
    if low == -math.inf and high == math.inf:
        allowed = "a finite number"
    elif high == math.inf:
        allowed = f"a finite number {'>=' if low_closed else '>'} {_fmt(low)}"
    elif low == -math.inf:
        allowed = f"a finite number {'<=' if high_closed else '<'} {_fmt(high)}"
    else:
        allowed = (f"a number in {'[' if low_closed else '('}{_fmt(low)}, {_fmt(high)}"
                   f"{']' if high_closed else ')'}")
    if allow_none:
        allowed += " or None"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(arg, value, allowed)
    x = float(value)
    ok = math.isfinite(x) and (x >= low if low_closed else x > low) and (
        x <= high if high_closed else x < high)
    if not ok:
        raise invalid(arg, value, allowed)
    return x


def check_bool(arg: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (``"False"`` and ``0`` are not).

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(value, bool):
        raise invalid(arg, value, "True or False")
    return value


def check_choice(arg: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``.

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(value, str) or value not in allowed:
        raise invalid(arg, value, f"one of {tuple(allowed)}")
    return value


def check_str(arg: str, value: Any, *, allow_none: bool = False,
              allow_empty: bool = False) -> Any:
    """``value`` if it is a string (non-empty unless ``allow_empty``), or an allowed ``None``.

    Raises:
        ValueError: otherwise.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or (not value and not allow_empty):
        what = "a string" if allow_empty else "a non-empty string"
        raise invalid(arg, value, what + (" or None" if allow_none else ""))
    return value


def check_path(arg: str, value: Any, *, allow_none: bool = False) -> Path | None:
    """``Path(value)`` for a non-empty ``str`` or ``os.PathLike``, or an allowed ``None``.

    Raises:
        ValueError: otherwise.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (str, os.PathLike)) and os.fspath(value) not in ("", b""):
        return Path(os.fspath(value))  # type: ignore[arg-type]
    raise invalid(arg, value, "a path (str or os.PathLike)" + (" or None" if allow_none else ""))


def check_callable(arg: str, value: Any, what: str = "a callable") -> Callable[..., Any]:
    """``value`` if it is callable.

    Raises:
        ValueError: otherwise.
    """
    if not callable(value):
        raise invalid(arg, value, what)
    return value  # type: ignore[no-any-return]


def check_regex(arg: str, value: Any) -> re.Pattern[str] | None:
    """The compiled regular expression ``value``, or ``None`` for ``None``.

    Example:
        >>> check_regex("include", "(")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: include='(' is invalid: must be a valid regular expression (missing ), ...)

    Raises:
        ValueError: for a non-string or a pattern that does not compile.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(arg, value, "None or a regular expression (a string)")
    try:
        return re.compile(value)
    except re.error as e:
        raise invalid(arg, value, f"a valid regular expression ({e})") from e


#: Schemes :func:`check_http_url` accepts.
HTTP_SCHEMES = ("http", "https")
#: Ports :func:`check_http_url` accepts, both ends included.
PORT_RANGE = (1, 65535)


def check_http_url(arg: str, value: Any, *, shown: object = None) -> urllib.parse.SplitResult:
    """``value`` split into its parts, if it is a usable ``http://`` or ``https://`` URL.

    Checked, in this order: a string; no whitespace or control characters anywhere (they
    would be cut off or smuggled into the request line); scheme ``http`` or ``https``
    (any case); a host; and, when a port is written, ASCII digits in ``1..65535``
    (``urllib`` itself would accept ``:99999`` and connect to port ``99999 % 65536``).
    Credentials (``user:password@host``) are allowed: the caller decides what to do with
    them (:attr:`~urllib.parse.SplitResult.username` and ``.password`` are still
    percent-encoded).

    Args:
        arg: The argument's name as the user typed it (or the environment variable).
        value: The value to check.
        shown: What the message shows in place of the value, for a URL that is a secret
            (``None`` shows the value). With ``shown``, only the port number, never
            another part of the URL, appears in a message.

    Returns:
        :func:`urllib.parse.urlsplit` of ``value``.

    Raises:
        ValueError: For anything else, naming ``arg`` and what is allowed.

    Example:
        >>> check_http_url("url", "https://hooks.example.com/T0/B0").hostname
        'hooks.example.com'
        >>> check_http_url("url", "http://127.0.0.1:99999/hook")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: url='http://...:99999/hook' is invalid: must be ... port in 1..65535, not 99999
        >>> check_http_url("url", "ftp://example.com/x", shown="<hidden>")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: url='<hidden>' is invalid: must be ... with a host (the URL itself is not...
    """
    display = value if shown is None else shown
    secret = "" if shown is None else " (the URL itself is not shown: it is a secret)"
    kind = "an http:// or https:// URL"
    if not isinstance(value, str):
        raise invalid(arg, display, f"{kind} (a string), not {type(value).__name__}"
                      + ("" if shown is None else " (the value is not shown: it may be a secret)"))
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise invalid(arg, display, f"{kind} without whitespace or control characters{secret}")
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname
    except ValueError:  # e.g. a malformed IPv6 host
        parts, host = None, None
    if parts is None or parts.scheme not in HTTP_SCHEMES or not host:
        raise invalid(arg, display, f"{kind} with a host{secret}")
    hostport = parts.netloc.rpartition("@")[2]
    port = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    port = port.rpartition(":")[2] if ":" in port else ""
    low, high = PORT_RANGE
    if port and not (port.isascii() and port.isdigit() and low <= int(port) <= high):
        got = f", not {int(port)}" if port.isascii() and port.isdigit() else ""
        raise invalid(arg, display, f"{kind} with a port in {low}..{high}{got}{secret}")
    return parts
