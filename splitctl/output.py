"""How splitctl prints: tables, sizes, rates, durations, progress, the JSON
form of a result, and failures. Everything a command shows goes through here,
so two commands never print the same thing two ways.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TextIO

from common.names import format_size
from splitctl.args import PROG

__all__ = [
    "eta_text",
    "fail",
    "format_duration",
    "format_size",
    "listener_text",
    "percent",
    "print_fields",
    "print_json",
    "print_table",
    "progress_bar",
    "progress_text",
    "rate_text",
    "regions_text",
    "split_gen_text",
    "stdout_gone",
    "terminal_width",
    "time_text",
]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                right: Collection[int] = frozenset(), indent: int = 0,
                empty: str | None = None) -> None:
    """Columns padded to their widest cell; columns in `right` aligned right.
    With no rows and `empty` given, that line instead of a bare header."""
    if not rows and empty is not None:
        print(empty)
        return
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print(" " * indent + "  ".join(cells).rstrip())


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """One "key: value" line per field, the values lined up."""
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {value}")


def print_json(result: object) -> None:
    """A result as scripts see it: exactly what the admin API returned."""
    print(json.dumps(result, indent=2, sort_keys=True))


def fail(status: int, code: str, message: str, as_json: bool, line: str | None = None,
         base: Mapping[str, Any] | None = None) -> int:
    """A failure: with --json, {"error": {"code", "message"}} on stdout (added
    to `base` when there is one); always one line on stderr. Returns `status`."""
    if as_json:
        try:
            print_json(dict(base or {}, error={"code": code, "message": message}))
            sys.stdout.flush()
        except BrokenPipeError:
            stdout_gone()
    print(line or f"{PROG}: {message}", file=sys.stderr)
    return status


def stdout_gone() -> None:
    # `splitctl volume list | head`: the reader left. Point stdout at
    # /dev/null so the flush at exit does not fail a second time.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def rate_text(rate: int) -> str:
    return "unlimited" if not rate else f"{format_size(rate)}/s"


def regions_text(n: int, region_size: int, short: bool = False) -> str:
    # Bytes are at most n whole regions: the volume's last region may be shorter.
    if short:
        return "0" if n == 0 else f"{n} ({format_size(n * region_size)})"
    return f"{n} region{'s' if n != 1 else ''} ({format_size(n * region_size)})"


def split_gen_text(pair: Mapping[str, Any]) -> str:
    """"3 (delta since split 2)": a pair's split generation and its delta's base
    (controller/pairs.py, "Split generations")."""
    base = pair.get("delta_base")
    return (f"{pair['split_gen']} (delta since split {base})" if base is not None
            else f"{pair['split_gen']} (delta: every region, no base)")


def percent(pair: Mapping[str, Any]) -> float:
    done, total = pair["progress"]["done"], pair["progress"]["total"]
    return 100.0 if total <= 0 else min(100.0, 100.0 * done / total)


def progress_text(pair: Mapping[str, Any]) -> str:
    prog = pair["progress"]
    return f"{prog['done']}/{prog['total']} regions ({percent(pair):.1f}%)"


def eta_text(pair: Mapping[str, Any]) -> str:
    if pair["remaining"] == 0:
        return "-"
    eta = pair.get("eta_s")
    return "unknown" if eta is None else format_duration(eta)


def time_text(when: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp} ({format_duration(time.time() - when)} ago)"


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal `stream` is on ($COLUMNS first, as shutil does;
    80 when unknown). shutil.get_terminal_size asks stdout, which may be a pipe."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def progress_bar(pair: Mapping[str, Any], width: int) -> str:
    """One terminal line: name, state, [####....], regions, %, rate, ETA."""
    prog = pair["progress"]
    pct = percent(pair)
    head = f"{pair['name']} {pair['state']} "
    tail = (f" {prog['done']}/{prog['total']} regions {pct:5.1f}% "
            f"{format_size(pair['copy_rate'])}/s ETA {eta_text(pair)}")
    room = min(40, width - 1 - len(head) - len(tail) - 2)
    if room < 10:   # too narrow for a bar: the numbers alone, cut to fit
        return (head + tail.lstrip())[:max(width - 1, 1)]
    filled = int(room * pct / 100)
    return f"{head}[{'#' * filled}{'.' * (room - filled)}]{tail}"


def listener_text(listener: object) -> str:
    # "backup=tcp://%eth1:10809 on 10.0.0.1:10809, TLS required": the port
    # name (when it says more than the URI), the bound addresses only when
    # the URI did not already spell them out.
    if not isinstance(listener, dict):
        return str(listener)
    uri = str(listener.get("uri", ""))
    name = str(listener.get("name", ""))
    text = f"{name}={uri}" if name and uri and name != uri else (uri or name or str(listener))
    bound = [str(b) for b in listener.get("bound") or [] if str(b) not in uri]
    if bound:
        text += f" on {', '.join(bound)}"
    if listener.get("tls_required"):
        text += ", TLS required"
    return text
