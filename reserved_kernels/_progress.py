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
