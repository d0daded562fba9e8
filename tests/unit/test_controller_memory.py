"""Freed memory goes back to the system."""

from __future__ import annotations

import asyncio
import platform

import pytest

from modelbudget.controller import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_trims_on_glibc() -> None:
    assert memory.release() is True


def test_keep_releasing_calls_release_each_period_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def release() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(memory, "release", release)

    async def run() -> None:
        task = asyncio.create_task(memory.keep_releasing(period=0))
        while len(calls) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(calls) >= 3
