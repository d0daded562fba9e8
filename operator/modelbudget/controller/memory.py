"""Giving freed memory back to the system.

CPython hands freed blocks back to the C allocator, and glibc's malloc keeps the pages for reuse:
after a burst (the first round of reconciles after a start, a relist) the process would hold its
high-water mark for good.  ``malloc_trim(0)`` returns the free pages; once a minute it costs a few
milliseconds.  Elsewhere (musl, macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from collections.abc import Callable

RELEASE_PERIOD_SECONDS = 60.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release() -> bool:
    """Return the allocator's free pages to the system; whether there was a way to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def keep_releasing(period: float = RELEASE_PERIOD_SECONDS) -> None:
    """``release`` every ``period`` seconds, off the event loop (it walks the heap), until cancelled."""
    while True:
        await asyncio.sleep(period)
        await asyncio.to_thread(release)
