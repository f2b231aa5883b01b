"""Progress that stays readable: a tqdm bar in a terminal, a plain line every N steps or S seconds elsewhere.

Outside a terminal (CI, SLURM, nohup, a pipe) tqdm writes every refresh as a new line, so a 600-step
run leaves thousands of lines. `progress_bar()` gives the bar only when stderr is a terminal (or a notebook)
and otherwise a `LineProgress` with the same small interface: `update`, `set_postfix`, `write`, `close`,
iteration.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm import autonotebook
from tqdm.auto import tqdm

EVERY_STEPS = 50
EVERY_SECONDS = 30.0


def progress_bar(
    iterable: Iterable[Any] | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
    disable: bool = False, every: int = EVERY_STEPS, seconds: float = EVERY_SECONDS, unit: str = "it",
) -> "Progress":
    """A tqdm bar where it redraws in place; else a line every `every` steps or `seconds` seconds."""
    if _interactive(sys.stderr):
        return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, unit=unit)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, disable=disable, every=every,
                        seconds=seconds, unit=unit)


def _interactive(stream: TextIO) -> bool:
    """A terminal redraws tqdm's line; a notebook shows its widget. Anything else only appends."""
    if autonotebook.tqdm.__module__ == "tqdm.notebook":
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """tqdm's interface, printing `desc step n/total (p%) | key=value ... | rate, elapsed, eta` lines.

    A line comes on the first update, every `every` steps, after `seconds` without one, and at
    `close` if the last position was not printed yet.
    """

    def __init__(
        self, iterable: Iterable[Any] | None = None, total: int | None = None, initial: int = 0, desc: str = "",
        disable: bool = False, every: int = EVERY_STEPS, seconds: float = EVERY_SECONDS, unit: str = "it",
        stream: TextIO | None = None,
    ) -> None:
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.desc, self.disable, self.unit = total, initial, desc, disable, unit
        self.every, self.seconds = max(int(every), 1), seconds
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self._start_n, self._started = initial, time.monotonic()
        self._last_time, self._printed_n = self._started, None

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **fields: Any) -> None:
        """Fields for the next line; tqdm redraws on this call, a line waits for the next `update`."""
        self.postfix = fields

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = self._printed_n is None or self.n % self.every == 0 or now - self._last_time >= self.seconds
        if due:
            self._emit(now)

    def write(self, text: str) -> None:
        """A message between progress lines, on stdout like `tqdm.write`."""
        if not self.disable:
            print(text, flush=True)

    def close(self) -> None:
        if self._printed_n != self.n and self.n > self._start_n:
            self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        self._last_time, self._printed_n = now, self.n
        if self.disable:
            return
        where = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc} {where}".strip()]
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        elapsed = now - self._started
        done = self.n - self._start_n
        timing = f"{done / elapsed:.2f} {self.unit}/s, elapsed {_clock(elapsed)}" if elapsed > 0 else ""
        if timing and self.total and done > 0:
            timing += f", eta {_clock(elapsed / done * max(self.total - self.n, 0))}"
        parts += [timing] if timing else []
        print(" | ".join(parts), file=self.stream or sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


Progress = tqdm | LineProgress
