"""Progress of long loops (predict, evaluate, check-data): a tqdm bar on a terminal, as training shows, and
periodic lines where stderr is a log or a pipe ("predict: 500/1000 images, 12.3 img/s, eta 40 s").

A line is written each time another tenth of the work is done or 30 s after the last line, whichever comes
first, and once at the end (ours: a log of a long run shows it advancing, a log of a short one stays short).
It lives beside `medseg.files` rather than in the engine because `medseg.data.check` uses it too.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")
LINE_INTERVAL_S = 30.0
UNIT_SHORT = {"images": "img", "cases": "case", "batches": "batch"}


class Progress:
    """Counts work done out of `total`; `update(n)` after each piece. Use as a context manager."""

    def __init__(self, what: str, total: int, unit: str = "images", stream: IO[str] | None = None,
                 bar: bool | None = None, interval_s: float = LINE_INTERVAL_S):
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.done = 0
        self._started = self._last_line = time.perf_counter()
        self._tenths = 0
        show_bar = _is_terminal(self.stream) if bar is None else bar
        self._bar = None
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=UNIT_SHORT.get(unit, unit), file=self.stream, leave=False,
                             dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(finished=exc_info[0] is None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        tenths = 10 * self.done // self.total if self.total else 10
        if self.done < self.total and (tenths > self._tenths or now - self._last_line >= self.interval_s):
            self._line(now)
        self._tenths = tenths

    def close(self, finished: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif finished and self.total:
            self._line(time.perf_counter(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        tail = (f"{elapsed:.0f} s" if final else
                f"eta {(self.total - self.done) / rate:.0f} s" if rate > 0 else "eta ?")
        self.stream.write(f"{self.what}: {self.done}/{self.total} {self.unit}, "
                          f"{rate:.1f} {UNIT_SHORT.get(self.unit, self.unit)}/s, {tail}\n")
        self.stream.flush()
        self._last_line = now


def track(items: Iterable[T], what: str, total: int, unit: str = "images") -> Iterator[T]:
    """Iterate `items` (`total` of them) with a Progress counting one per item."""
    with Progress(what, total, unit) as progress:
        for item in items:
            yield item
            progress.update()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False
