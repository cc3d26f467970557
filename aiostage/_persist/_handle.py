"""``SaveHandle``: the background write started by a stager's ``save()``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

__all__ = ["SaveHandle"]


class SaveHandle:
    """A checkpoint write running in the background.

    Returned by a stager's ``save()``.  When you get it, *staging is done*:
    the state has been copied into the stager's buffers, so training may
    modify the live state again.  *Writing* the file goes on in the
    background; ``await handle.wait()`` returns the checkpoint's path once
    it is durable on disk (fsynced and renamed into place), or raises the
    write's error (:class:`aiostage.PersistError`).  This mirrors the split
    of ``torch.distributed.checkpoint``'s ``AsyncSaveResponse`` between the
    staging step and the upload-completion future.

    Args:
        task: the task running the write; its result is the path.
        staged: the staged object being written (exposed as :attr:`staged`).
        on_finish: called exactly once, on the event loop, when the task
            ends however it ends (success, error or cancellation); stagers
            use it to release their buffers.  An exception it raises is
            reported to the loop's exception handler, not to waiters.
    """

    def __init__(
        self,
        task: asyncio.Task[Path],
        *,
        staged: Any = None,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self._task = task
        self._staged = staged
        self._on_finish = on_finish
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Path]) -> None:
        callback, self._on_finish = self._on_finish, None
        if callback is None:
            return
        try:
            callback()
        except Exception as exc:
            task.get_loop().call_exception_handler(
                {"message": "SaveHandle on_finish callback failed", "exception": exc}
            )

    @property
    def staged(self) -> Any:
        """The staged copy of the state that is being written.

        It belongs to the stager; do not modify it while the write runs.
        ``None`` once the stager is closed: closing releases the buffers it
        points into.
        """
        return self._staged

    def _release_staged(self) -> Any:
        """Forget the staged copy (its stager is closing); return it, so that
        the caller drops the last reference where freeing it costs nothing."""
        staged, self._staged = self._staged, None
        return staged

    async def wait(self) -> Path:
        """Wait until the checkpoint is durable; return its path.

        Raises:
            PersistError: the write failed (the previous checkpoint is intact).
            asyncio.CancelledError: the write was cancelled with :meth:`cancel`.

        Cancellation:
            Cancelling the *waiter* does not cancel the write, which goes on
            in the background (use :meth:`cancel` for that); the waiter's
            cancellation is re-raised.
        """
        return await asyncio.shield(self._task)

    def __await__(self) -> Generator[Any, None, Path]:
        """``await handle`` is ``await handle.wait()``."""
        return self.wait().__await__()

    def done(self) -> bool:
        """Whether the write has ended (successfully or not)."""
        return self._task.done()

    def cancelled(self) -> bool:
        """Whether the write ended by being cancelled."""
        return self._task.cancelled()

    def cancel(self) -> bool:
        """Cancel the background write.

        The writer stops issuing I/O, waits for the chunk in flight, removes
        its temp file and leaves the previous checkpoint in place; ``on_finish``
        then runs.  Returns ``False`` if the write had already ended.  A later
        :meth:`wait` raises :class:`asyncio.CancelledError`.
        """
        return self._task.cancel()

    def __repr__(self) -> str:
        state = "pending"
        if self._task.done():
            state = "cancelled" if self._task.cancelled() else "done"
        return f"<SaveHandle {state}>"
