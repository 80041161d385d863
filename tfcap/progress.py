"""Progress bars and closing summary lines, both on stderr so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

import click


@contextlib.contextmanager
def progress_bar(total: int | None, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`, which moves a stderr progress bar of `total` items by n."""
    if not enabled:
        yield lambda n=1: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                           show_eta=True, width=30) as bar:
        yield bar.update


class Stopwatch:
    """Wall time since construction, and a rate over it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def rate(self, count: float) -> float:
        return count / max(self.seconds, 1e-9)


def summary(line: str) -> None:
    """Print the one-line closing summary of a long job on stderr."""
    click.echo(line, err=True)
