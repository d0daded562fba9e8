"""Lease leader election: one leader at a time, takeover after expiry, fencing before it."""

from __future__ import annotations

import asyncio

import pytest

from modelbudget.controller.leader import LeaderElector
from tests.unit.fakes import Clock, FakeLeaseStore


def elector(store: FakeLeaseStore, clock: Clock, name: str) -> LeaderElector:
    return LeaderElector(store, name, lease_duration=15, renew_deadline=10, retry_period=2, monotonic=clock)


def test_first_candidate_leads_and_the_second_stands_by() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.step() and a.is_leader and a.term == 1
    assert not b.step()
    clock.t += 2
    assert a.step() and not b.step()
    assert store.record is not None and store.record.holder == "a"


def test_standby_takes_over_only_after_the_lease_expires_and_the_old_leader_stopped_first() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.step()
    b.step()  # b observes a's record now
    clock.t += 10  # a dies: no more renewals
    assert not a.is_leader  # fenced at renew_deadline, before anyone can take over
    assert not b.step()
    clock.t += 5
    assert b.step() and b.is_leader
    assert store.record is not None and store.record.holder == "b" and store.record.transitions == 1


def test_a_leader_that_cannot_renew_stops_acting() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a = elector(store, clock, "a")
    a.step()
    store.reachable = False
    clock.t += 5
    assert a.step()  # still within the renew deadline
    clock.t += 5
    assert not a.step() and not a.is_leader


def test_release_hands_over_without_waiting() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    a.step()
    b.step()
    a.release()
    assert not a.is_leader
    assert b.step()


def test_reacquiring_starts_a_new_term() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a = elector(store, clock, "a")
    a.step()
    clock.t += 11
    assert not a.is_leader
    assert a.step() and a.term == 2


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaderElector(FakeLeaseStore(), "a", lease_duration=10, renew_deadline=10)


def test_run_reports_changes_and_releases_on_cancel() -> None:
    store = FakeLeaseStore()
    seen: list[bool] = []

    async def main() -> None:
        e = LeaderElector(store, "a", lease_duration=3, renew_deadline=2, retry_period=0.05)
        task = asyncio.create_task(e.run(seen.append))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == [True, False]
    assert store.record is not None and store.record.holder is None
