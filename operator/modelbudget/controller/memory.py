"""Keeping the heap out of the way: freed memory given back, long-lived objects out of the
collector's sight.

CPython hands freed blocks back to the C allocator, and glibc's malloc keeps the pages for reuse:
after a burst (the first round of reconciles after a start, a relist) the process would hold its
high-water mark for good.  ``malloc_trim(0)`` returns the free pages; once a minute it costs a few
milliseconds.  ``tune_allocator`` keeps large transient blocks (answer bodies) out of the heap
and the number of malloc arenas small.  Elsewhere (musl, macOS) there is nothing to call and
nothing is done.

The cyclic garbage collector's full collections walk every object the process holds, and at
N = 1,000 (kopf's copy of each object, the watch caches, each ModelBudget's state, group answers of
a thousand members' series) each took 0.5-1.2 s, every few seconds: the event loop stood still
that long, and they were the slowest reconciles.  Once a minute what is alive is frozen
(``gc.freeze``: moved where collections do not look; reference counting still frees it), so a
collection walks only what is younger than a minute; what died in cycles within the minute is
collected just before (a walk of that minute's objects, not of all); once an hour everything is
collected, so garbage of cycles that reach into the frozen is freed within the hour.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable
from typing import Any

RELEASE_PERIOD_SECONDS = 60.0
FULL_COLLECTION_EVERY = 60  # release periods: an hour


@functools.cache
def _libc(name: str, restype: Any, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's function ``name`` with its C signature, or None where there is none (musl
    has no ``malloc_trim``; macOS neither it nor ``mallopt``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    function = getattr(libc, name, None)
    if function is None:
        return None
    function.argtypes, function.restype = list(argtypes), restype
    return function  # type: ignore[no-any-return]


# mallopt(3) parameters (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks this large or larger are mapped on their own and unmapped when freed. glibc starts at
# 128 KiB but raises the threshold to the size of each mapped block freed (up to 32 MiB): after the
# first group answers (a 1.7 MB body per histogram query at N = 1,000), each later one was carved
# from the heap instead, and the holes between them stayed. A fixed value stops the raising.
MMAP_THRESHOLD_BYTES = 128 * 1024
# One arena per thread that allocates (up to 8 per core) each keep their own free pages: the
# operator's query, watch and executor threads do little allocation, so two arenas serve them.
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Set glibc's mmap threshold and arena count (``MMAP_THRESHOLD_BYTES``, ``ARENA_MAX``) for a
    long-running process; call it before threads start. Whether it could (glibc only; mallopt
    answers 1 for each setting it took)."""
    mallopt = _libc("mallopt", ctypes.c_int, ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_ARENA_MAX, ARENA_MAX))


def release() -> bool:
    """Return the allocator's free pages to the system; whether there was a way to."""
    trim = _libc("malloc_trim", ctypes.c_int, ctypes.c_size_t)
    if trim is None:
        return False
    trim(0)
    return True


def freeze(collect_all: bool) -> None:
    """Collect, then move every object alive out of the collector's way. The collection walks
    only what is younger than the last freeze (milliseconds), and keeps that period's cyclic
    garbage from being frozen with the living; with ``collect_all`` it walks everything, the
    frozen included (one full pause)."""
    if collect_all:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


async def keep_releasing(
    period: float = RELEASE_PERIOD_SECONDS, full_collection_every: int = FULL_COLLECTION_EVERY
) -> None:
    """Every ``period`` seconds until cancelled: ``freeze`` (a full collection every
    ``full_collection_every`` periods), then ``release`` off the event loop (it walks the heap)."""
    periods = 0
    while True:
        await asyncio.sleep(period)
        periods += 1
        freeze(collect_all=periods % full_collection_every == 0)
        await asyncio.to_thread(release)
