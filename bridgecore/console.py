"""Progress bars that suit where they are read: live bars on a terminal, one plain line every half minute in a
redirected log (a `\\r`-updated bar there is thousands of lines of one row). The ground floor: imports nothing of
the library."""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0  # seconds between the lines of a bar written to a log


class _Lines:
    """A file for tqdm that turns each `\\r` redraw into one finished line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def on_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(iterable=None, **options):
    """`tqdm(iterable, **options)` on a terminal; in a log, a line per `LOG_INTERVAL_S` and one at the end."""
    from tqdm.auto import tqdm

    if on_terminal() or options.get("disable"):
        return tqdm(iterable, **options)
    options.pop("leave", None)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 4,
                ascii=True, leave=True, **options)


def quiet_library_bars() -> None:
    """Off in a log: transformers' and diffusers' own loading bars (short, but each a screen of `\\r` redraws)."""
    if on_terminal():
        return
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
