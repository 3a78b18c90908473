"""Progress of long runs: a live bar on a terminal, plain periodic log lines off one.

tqdm draws with carriage returns, which turn a log file or a CI console into one enormous line; off
a terminal the same calls write a ``logging`` line at most every :data:`LOG_EVERY_S` seconds (and
at the end), with done/total, rate and ETA. ``--no-progress`` and ``--quiet`` switch both off for
the whole process through :func:`configure`, so a bar deep in the library obeys them too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

logger = logging.getLogger("fedrlhf_secure.progress")

LOG_EVERY_S = 15.0
_enabled = True


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...

    def set_postfix_str(self, text: str) -> None: ...

    def close(self) -> None: ...


def configure(*, enabled: bool) -> None:
    """Switch every progress display of this process on or off (the CLI's ``--no-progress``/``--quiet``)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def bar(total: int | None, desc: str, unit: str, *, initial: int = 0, show: bool = True, leave: bool = True) -> Progress:
    """A progress display for ``total`` steps: tqdm on a terminal, log lines elsewhere, nothing if off."""
    if not (_enabled and show):
        return _Silent()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=leave, dynamic_ncols=True)
    return LogLines(total, desc, unit, initial=initial)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LogLines:
    """The off-terminal display: one INFO line per :data:`LOG_EVERY_S` seconds, and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, clock: Any = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.start_done = initial
        self.status = ""
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= LOG_EVERY_S or (self.total is not None and self.done >= self.total):
            self._emit(now)

    def set_postfix_str(self, text: str) -> None:
        self.status = text
        now = self._clock()
        if now - self._last >= LOG_EVERY_S:
            self._emit(now)

    def close(self) -> None:
        if not self._closed and self._last == self._start and self.done > self.start_done:
            self._emit(self._clock())
        self._closed = True

    def line(self, now: float) -> str:
        elapsed = now - self._start
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}s"]
        moved = self.done - self.start_done
        if moved > 0 and elapsed > 0:
            per = elapsed / moved
            parts.append(f"{per:.1f} s/{self.unit}")
            if self.total is not None and self.done < self.total:
                parts.append(f"ETA {_clock_text((self.total - self.done) * per)}")
        parts.append(f"elapsed {_clock_text(elapsed)}")
        if self.status:
            parts.append(self.status)
        return " · ".join(parts)

    def _emit(self, now: float) -> None:
        logger.info("%s", self.line(now))
        self._last = now


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
