"""Staging options: what the stagers copy into and how."""

from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["StagingOptions", "accelerator_available"]

#: Default size of one unit of copy work (bytes).  Big enough that per-chunk
#: overhead is negligible (each chunk is one hand-off to a worker thread and
#: back, ~0.3 ms here: at 16 MiB they cost 0.1 of a warm 1 GiB stage, at
#: 64 MiB 0.05), small enough that cancellation and pipelining to the writer
#: stay responsive (~10 ms of copying at memory bandwidth).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def accelerator_available() -> bool:
    """True when torch reports a usable accelerator (CUDA, XPU, MPS, ...)."""
    try:
        return bool(torch.accelerator.is_available())
    except (RuntimeError, AttributeError):  # pragma: no cover - exotic builds
        return False


@dataclasses.dataclass(frozen=True)
class StagingOptions:
    """How a :class:`DefaultStager` stages.

    The accelerator-only options (``use_pinned_memory``,
    ``use_non_blocking_copy``) default to ``None``, meaning "on when an
    accelerator is available", so ``StagingOptions()`` works everywhere.
    Setting them to ``True`` explicitly on a machine without an accelerator
    is accepted: pinning then warns once and is ignored, and non-blocking
    copies fall back to copies in worker threads.

    Attributes:
        use_pinned_memory: stage into page-locked host memory, so that
            device-to-host copies run asynchronously at full bandwidth.
        use_shared_memory: stage into shared memory (``is_shared()``), for
            handing the staged state to another process without a copy.
        use_async_staging: copy in the background (worker threads on CPU,
            a side stream on an accelerator) while the event loop runs.  When
            ``False`` the copy runs inline on the calling thread, which blocks
            the event loop; only useful for debugging.
        use_non_blocking_copy: issue device-to-host copies non-blocking on a
            side stream and poll their completion events.
        pin_memory_min_bytes: storages smaller than this are not pinned
            (pinning has a fixed cost per allocation).
        chunk_bytes: size of one unit of copy work.  Large storages are split
            into chunks of this size; small ones are batched up to it.
        copy_threads: worker threads copying at once on CPU.  By default
            as many as the CPUs, at most 4, except for a stage that copies
            into newly allocated buffers, which uses one: page faults taken
            by several threads contend with each other and take the event
            loop's core (2-core VM, 1 GiB: warm stage 0.85x -> 1.02x of
            memcpy with two threads at the same loop lag; first stage p99
            lag 0.8 ms with one thread, 1.1-3.5 ms with two).
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool = False
    use_async_staging: bool = True
    use_non_blocking_copy: bool | None = None
    pin_memory_min_bytes: int = 5
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    copy_threads: int | None = None

    def __post_init__(self) -> None:
        if self.pin_memory_min_bytes < 0:
            raise ValueError(
                f"StagingOptions.pin_memory_min_bytes must be >= 0, got {self.pin_memory_min_bytes}"
            )
        if self.chunk_bytes <= 0:
            raise ValueError(f"StagingOptions.chunk_bytes must be > 0, got {self.chunk_bytes}")
        if self.copy_threads is not None and self.copy_threads <= 0:
            raise ValueError(f"StagingOptions.copy_threads must be > 0, got {self.copy_threads}")

    @property
    def pinned(self) -> bool:
        """Whether pinned memory is requested (resolving the ``None`` default)."""
        if self.use_pinned_memory is None:
            return accelerator_available()
        return self.use_pinned_memory

    @property
    def non_blocking(self) -> bool:
        """Whether non-blocking copies are requested (resolving ``None``)."""
        if self.use_non_blocking_copy is None:
            return accelerator_available()
        return self.use_non_blocking_copy

    @property
    def threads(self) -> int:
        """The number of CPU copy threads (resolving ``None``)."""
        if self.copy_threads is not None:
            return self.copy_threads
        return max(1, min(4, os.cpu_count() or 1))
