"""The KwokNodePool controller's pure plan: provisioning delay, scale-down order, restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modelbudget.testbed.poolcontroller import node_name, plan

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_new_nodes_wait_out_the_provisioning_delay():
    first = plan("gpu", 2, 20, existing=set(), provisioning=[], now=T0)
    assert first.create == [] and first.delete == []
    assert [p["name"] for p in first.provisioning] == [node_name("gpu", 0), node_name("gpu", 1)]
    # The schedule is carried (in the pool's status): the same nodes become due, not later ones.
    early = plan("gpu", 2, 20, existing=set(), provisioning=first.provisioning, now=T0 + timedelta(seconds=10))
    assert early.create == [] and len(early.provisioning) == 2
    due = plan("gpu", 2, 20, existing=set(), provisioning=first.provisioning, now=T0 + timedelta(seconds=20))
    assert due.create == [node_name("gpu", 0), node_name("gpu", 1)] and due.provisioning == []


def test_scale_down_removes_the_highest_index_first_and_cancels_pending():
    existing = {node_name("gpu", i) for i in range(12)}
    pending = [{"name": node_name("gpu", 12), "readyAt": (T0 + timedelta(seconds=5)).isoformat()}]
    shrink = plan("gpu", 9, 20, existing=existing, provisioning=pending, now=T0)
    assert shrink.delete == [node_name("gpu", 11), node_name("gpu", 10), node_name("gpu", 9)]
    assert shrink.create == [] and shrink.provisioning == []


def test_a_steady_pool_does_nothing():
    existing = {node_name("gpu", i) for i in range(3)}
    steady = plan("gpu", 3, 20, existing=existing, provisioning=[], now=T0)
    assert (steady.create, steady.delete, steady.provisioning) == ([], [], [])
