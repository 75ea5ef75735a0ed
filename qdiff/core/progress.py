"""Progress for the long steps, silenced with QDIFF_QUIET=1 or --quiet.

On a terminal: a tqdm bar on stderr, redrawn in place. Anywhere else (CI logs, `| tee`, a
file): a few plain lines (start, every quarter, end) instead of one redraw per step, which a
log would keep as hundreds of carriage-return fragments on one line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator


def quiet() -> bool:
    return os.environ.get("QDIFF_QUIET", "") not in ("", "0")


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class PlainProgress:
    """The subset of tqdm's interface qdiff uses, printing plain lines at quarter marks.

    With an unknown total it prints at most one line per `mininterval` seconds (30 at least).
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None, unit: str = "it", mininterval: float = 30.0, **_: Any) -> None:
        self.iterable = iterable
        self.desc = desc or "progress"
        self.unit = unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.n = 0
        self.interval = max(mininterval, 30.0)
        self.started = time.perf_counter()
        self._next_quarter = 1
        self._last_print = self.started
        self._closed = False
        self._print(f"{self.desc}: started" + (f", {self.total} {self.unit}" if self.total else ""))

    def _print(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:.0f} s"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.total:
            while self._next_quarter < 4 and self.n * 4 >= self._next_quarter * self.total:
                self._print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({25 * self._next_quarter}%), {self._elapsed()}")
                self._next_quarter += 1
        elif now - self._last_print >= self.interval:
            self._print(f"{self.desc}: {self.n} {self.unit}, {self._elapsed()}")
            self._last_print = now

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; plain lines carry no postfix."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(f"{self.desc}: done, {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit} in {self._elapsed()}")

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in (self.iterable if self.iterable is not None else ()):
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(PlainProgress):
    def _print(self, text: str) -> None:
        pass


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A progress bar on a terminal, plain lines elsewhere, nothing when quiet."""
    if kwargs.pop("disable", None) or quiet():
        return _Silent(iterable, **kwargs)
    if not _interactive():
        return PlainProgress(iterable, **kwargs)
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    if not quiet():
        print(message, flush=True)


class Phases:
    """Wall-clock seconds per named phase of a stage, summed over every time the phase runs.

        phases = Phases()
        with phases("trajectories"):
            ...
        phases.seconds  # {"trajectories": 12.3}

    Stages fill one and hand it back in their result (and manifest details), so a driver can
    print where the time went, one line per phase (`lines`). Phases may nest; each one counts
    its own wall time, so nested phases are not additive with their parent.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __call__(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def rounded(self, digits: int = 2) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}

    def lines(self, prefix: str) -> list[str]:
        return [f"{prefix} {name}: {seconds:.1f} s" for name, seconds in self.seconds.items()]


class _Phase:
    def __init__(self, phases: Phases, name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> "_Phase":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.phases.add(self.name, time.perf_counter() - self.started)
