"""Pause the cyclic garbage collector while a stage, a load or a write's
pickling runs.

A stage of tens of thousands of tensors builds as many short-lived objects
(copy requests, segments, batches) that live exactly as long as the stage.
With the collector running, the young-generation collections during the
stage find them alive and promote them; they pile up as "long-lived" and
trigger a full collection every other stage, which walks every tracked
object in the process and holds the event loop for 25-40 ms (20,000
tensors, heap otherwise frozen) or much more in a large program.  With the
collector paused for the stage they are freed by reference counting when
the stage ends, before any collection sees them: over 10 stages of 20,000
tensors, 6 full collections of 27-33 ms without the pause, none with it
(and the loop's longest gap 2.5-3.2 ms instead of up to 33 ms).

A load of as many tensors makes them (and their containers) while it
unpickles, all alive until it returns: without the pause, three full
collections of 80-110 ms each held the loop during one load of 20,000
tensors; with it, one young collection of 7-10 ms after it returns (and
none since they are moved on, below).

A checkpoint write pauses it while it pickles the state and lays out its
write batches, for the same reason: pickling 10,000 tensors in a worker
thread set off a full collection of 85 ms on the way, and the event loop
waited for the GIL all through it.

The pause is process-wide (``gc.disable()``), nests (several stages or
loads at once), and lasts one call.  If the collector was already
disabled, it stays so.

**What survives the pause goes straight to the oldest generation.**  The
objects made during a pause that outlive it (a load's tensors, a stage's
staged copies, a write's record per storage) are all young when it ends,
and the first young collection after it scans every one of them, on
whichever thread allocates next, often the event loop's: 7-10 ms after a
load of 20,000 tensors, 19-41 ms after a first stage of as many, and now
and then a middle-generation collection of 30-177 ms.  When the pause ends,
``gc.freeze()`` followed at once by ``gc.unfreeze()`` moves every tracked
object to the oldest generation, without scanning any (two list splices):
those collections do not happen (in probes of 6 calls each, none over 1
ms, against the figures above).  Garbage cycles that other code made just
before or during the pause are then found by the next full collection
rather than the next young one.  This is skipped on interpreters without
a GIL, where a freeze walks the whole heap, and, for the rest of the
process, from the first pause that ends while the process has frozen
objects of its own (``gc.freeze()`` after set-up, or a pre-fork server's):
an unfreeze would thaw them, and counting them (``gc.get_freeze_count()``
walks them all) on every call would cost the loop more than the young
collection it saves.
"""

from __future__ import annotations

import contextlib
import gc
import sysconfig
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

_CAN_PROMOTE = hasattr(gc, "freeze") and not sysconfig.get_config_var("Py_GIL_DISABLED")
"""Whether a freeze and unfreeze move the tracked objects between lists in
constant time: CPython with the GIL (the free-threaded build's freeze marks
every object on the heap)."""

_lock = threading.Lock()
_depth = 0
_we_disabled = False
_process_froze = False
"""Set for good once a pause ends while the process has frozen objects."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic garbage collector for the ``with`` block."""
    global _depth, _we_disabled, _process_froze
    with _lock:
        if _depth == 0:
            _we_disabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _we_disabled:
                _we_disabled = False
                if _CAN_PROMOTE and not _process_froze:
                    if gc.get_freeze_count() == 0:  # (instant when none is frozen)
                        # To the oldest generation, unscanned (see above).
                        gc.freeze()
                        gc.unfreeze()
                    else:
                        _process_froze = True
                gc.enable()
