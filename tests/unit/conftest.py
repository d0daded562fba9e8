"""Unit-tier hooks."""

from __future__ import annotations

import gc

import pytest

from modelbudget.adapters.watchcache import WatchCache


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the watch threads that tests against short-lived mock apiservers left running: a daemon
    thread still inside a socket call while the interpreter shuts down can abort the process
    after every test has passed."""
    caches = [o for o in gc.get_objects() if isinstance(o, WatchCache)]
    for cache in caches:
        cache.stop()
    for cache in caches:
        cache._thread.join(timeout=5)
