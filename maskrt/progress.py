"""Progress bars that suit where they are written: live on a terminal, a line every few seconds in a log.

tqdm redraws its bar with a carriage return many times a second. On a terminal that is a live
bar; in a log file (CI, `nohup`, `> train.log`) it is one endless line of carriage returns. So
`progress_options` gives tqdm a live bar when the stream is a terminal, and otherwise a writer
that turns each redraw into its own line, at most one every `log_interval_s` seconds.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 10.0


class LineWriter:
    """A file for tqdm that writes each redraw as one line: the carriage return that starts a
    redraw is dropped and a newline ends it; empty writes (tqdm's final newline) are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def progress_options(stream: TextIO | None = None, log_interval_s: float = LOG_INTERVAL_S) -> dict[str, Any]:
    """tqdm keyword arguments for `stream` (default stderr): a live bar on a terminal; in a log,
    one line at most every `log_interval_s` seconds (`mininterval`), fixed width, ASCII."""
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        return {"file": stream, "dynamic_ncols": True}
    return {"file": LineWriter(stream), "mininterval": log_interval_s, "ncols": 100, "ascii": True}
