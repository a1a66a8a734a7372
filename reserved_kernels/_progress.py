"""Say what a slow step is doing, as transformers' loading does: a line on stderr once the step has taken a
second, and its time when it ends. Fast steps print nothing."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

AFTER_SECONDS = 1.0  # a step quicker than this says nothing


@contextlib.contextmanager
def announced(message: str) -> Iterator[None]:
    """Run the ``with`` body; if it is still running after :data:`AFTER_SECONDS`, print ``message`` (and later
    its time) on stderr."""
    start = time.perf_counter()
    said = threading.Event()

    def say() -> None:
        said.set()
        print(f"reserved_kernels: {message} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(AFTER_SECONDS, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            print(f"reserved_kernels: {message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)


class Ticker:
    """Progress of a long loop on stderr: :meth:`tick` prints its line at most once per :data:`AFTER_SECONDS`,
    and not before the loop has run that long; :meth:`done` prints the last one if any was printed."""

    def __init__(self, what: str, enabled: bool = True) -> None:
        self.what, self.enabled = what, enabled
        self.start = self.last = time.perf_counter()
        self.said = False

    def tick(self, status: str) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= AFTER_SECONDS:
            self.last, self.said = now, True
            print(f"reserved_kernels: {self.what}: {status} ({now - self.start:.0f} s)", file=sys.stderr, flush=True)

    def done(self, status: str) -> None:
        if self.said:
            print(f"reserved_kernels: {self.what}: {status}, done in {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)
