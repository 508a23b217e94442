"""Progress reporting hook: library code calls it, only the CLI draws anything."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional, Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None: ...


def silent(stage: str, done: int | None = None, total: int | None = None) -> None:
    """The default: report nothing."""


class Timer:
    """Named wall-clock timings of pipeline stages, in seconds."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.progress: Progress = progress or silent

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


ProgressFn = Callable[[str, Optional[int], Optional[int]], None]
