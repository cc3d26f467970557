"""Progress callbacks, shared by every call that moves bytes.

A progress callback is a plain function ``progress(bytes_done, bytes_total)``
called on the event-loop thread after each chunk; it must return quickly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

__all__ = ["Progress", "check_progress"]

Progress = Callable[[int, int], None]


def check_progress(progress: object) -> None:
    """Reject a ``progress`` that could never run: ``async def`` ones are
    called on the loop but their coroutines never awaited."""
    if progress is None:
        return
    if not callable(progress):
        raise TypeError(f"progress must be callable as progress(done, total), got {progress!r}")
    if inspect.iscoroutinefunction(progress) or inspect.iscoroutinefunction(
        getattr(progress, "__call__", None)  # noqa: B004 - an async __call__
    ):
        raise TypeError(
            "progress must be a plain function called as progress(done, total) on the "
            "event loop; an async def callback would never run"
        )
