"""Freed memory goes back to the system."""

from __future__ import annotations

import asyncio
import gc
import platform
import subprocess
import sys
import weakref

import pytest

from modelbudget.controller import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_trims_on_glibc() -> None:
    assert memory.release() is True


# In a process of its own: whether a 256 KiB block, allocated after a 4 MiB one was freed, is mapped
# on its own (glibc counts mapped blocks in mallinfo2's hblks).
_MAPPED_AFTER_A_LARGE_FREE = """
import ctypes, sys
from modelbudget.controller import memory
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert memory.tune_allocator()
large = bytearray(4 * 1024 * 1024)
del large
before = libc.mallinfo2().hblks
block = bytearray(256 * 1024)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize(("how", "mapped"), [("untuned", "0"), ("tuned", "1")])
def test_a_tuned_allocator_maps_large_blocks_even_after_a_larger_one_was_freed(how: str, mapped: str) -> None:
    """glibc raises its mmap threshold to each mapped block freed, so after one large answer every
    later one comes from the heap, and its holes stay; tuned, the threshold stays where it is."""
    done = subprocess.run(
        [sys.executable, "-c", _MAPPED_AFTER_A_LARGE_FREE, how], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == mapped


def run_periods(monkeypatch: pytest.MonkeyPatch, periods: int, **kwargs: int) -> tuple[int, list[bool]]:
    """``keep_releasing`` with no wait between periods, cancelled after ``periods``: how often it
    released, and each period's ``freeze(collect_all=...)`` (the process's own heap untouched)."""
    released: list[int] = []
    freezes: list[bool] = []
    monkeypatch.setattr(memory, "release", lambda: released.append(1) or True)
    monkeypatch.setattr(memory, "freeze", lambda collect_all: freezes.append(collect_all))

    async def run() -> None:
        task = asyncio.create_task(memory.keep_releasing(period=0, **kwargs))
        while len(released) < periods:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return len(released), freezes


def test_keep_releasing_calls_release_each_period_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    released, _ = run_periods(monkeypatch, 3)
    assert released >= 3


def test_keep_releasing_freezes_each_period_and_collects_everything_now_and_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, freezes = run_periods(monkeypatch, 6, full_collection_every=3)
    assert freezes[:6] == [False, False, True, False, False, True]


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_freeze_moves_what_is_alive_out_of_collections_and_a_full_one_frees_frozen_cycles() -> None:
    try:
        cycle = Node()
        gone = weakref.ref(cycle)
        memory.freeze(collect_all=False)
        assert gc.get_freeze_count() > 0
        del cycle  # garbage now, but frozen: no ordinary collection sees it
        gc.collect()
        assert gone() is not None
        memory.freeze(collect_all=True)  # unfreeze, collect everything, freeze again
        assert gone() is None
    finally:
        gc.unfreeze()


def test_garbage_made_since_the_last_freeze_is_collected_not_frozen() -> None:
    gc.disable()  # no automatic collection may free it first
    try:
        cycle = Node()
        gone = weakref.ref(cycle)
        del cycle
        memory.freeze(collect_all=False)
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.enable()
