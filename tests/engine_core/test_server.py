"""The engine-core process's start-up: what it leaves the garbage collector."""

from __future__ import annotations

import gc

from services.engine_core.server import freeze_startup_heap


def test_startup_heap_is_frozen() -> None:
    """Every object alive at start-up leaves the collector's generations (gc.freeze), so an
    oldest-generation collection while serving walks only what serving created."""
    gc.unfreeze()
    try:
        keep = [object() for _ in range(10)]  # tracked containers alive "at start-up"
        holder = [keep]
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is holder for o in gc.get_objects())
    finally:
        gc.unfreeze()
