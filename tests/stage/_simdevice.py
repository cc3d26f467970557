"""A simulated accelerator for the stream copier: its copies complete later.

Copies queued with ``copy_async`` run on a "device" thread, in order, only
while ``gate`` is open; ``record_event`` returns an event that completes when
the device thread has run everything queued before it.  The test holds the
gate to make copies complete as late as it likes.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import anyio
import torch


class SimEvent:
    def __init__(self, device: SimulatedDevice) -> None:
        self._done = threading.Event()
        self._device = device

    def query(self) -> bool:
        self._device.count_query()
        return self._done.is_set()


class SimulatedDevice:
    """Implements aiostage's ``DeviceOps`` protocol with deferred copies."""

    def __init__(self, *, gate_open: bool = True) -> None:
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()
        self.first_issue = threading.Event()
        self.calls: list[str] = []
        self.issued = 0
        self.executed = 0
        self.queries = 0
        self.fail_on: torch.UntypedStorage | None = None
        self._query_waiters: list[tuple[int, anyio.Event]] = []
        self._queue: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sim-device", daemon=True)
        self._thread.start()

    # DeviceOps
    def new_stream(self, device: torch.device) -> str:
        self.calls.append("new_stream")
        return "side-stream"

    def wait_for_compute(self, stream: Any, device: torch.device) -> None:
        self.calls.append("wait_for_compute")

    def copy_async(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.fail_on is not None and src.untyped_storage()._cdata == self.fail_on._cdata:
            raise RuntimeError("simulated device error")
        self.calls.append("copy_async")
        self.issued += 1
        self._queue.put(("copy", dst, src))
        self.first_issue.set()

    def record_event(self, stream: Any) -> SimEvent:
        event = SimEvent(self)
        self._queue.put(("event", event, None))
        return event

    def copy_blocking(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.calls.append("copy_blocking")
        self.issued += 1
        self.first_issue.set()
        self.gate.wait()
        dst.copy_(src)
        self.executed += 1

    # polling, observed from the loop thread (the stager polls there)
    def count_query(self) -> None:
        self.queries += 1
        for target, event in list(self._query_waiters):
            if self.queries > target:
                event.set()

    async def wait_for_queries(self, more_than: int) -> None:
        """Return once the stager has polled its events more than ``more_than`` times."""
        if self.queries > more_than:
            return
        event = anyio.Event()
        self._query_waiters.append((more_than, event))
        await event.wait()

    # the device
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            kind, a, b = self._queue.get()
            if kind == "stop":
                return
            self.gate.wait()
            if kind == "copy":
                a.copy_(b)
                self.executed += 1
            else:
                a._done.set()

    def stop(self) -> None:
        self.gate.set()
        self._queue.put(("stop", None, None))
        self._thread.join()
