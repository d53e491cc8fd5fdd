"""The proxy's session table: LRU per tenant, and never evicting a session that is serving a request."""

from __future__ import annotations

from quickdraft.proxy.sessions import SessionTable


async def test_lru_eviction_per_tenant_skips_busy_sessions():
    table = SessionTable(max_per_tenant=2)
    first, _ = table.get_or_create("t", "a", [1, 2])
    table.get_or_create("t", "b", [3, 4])
    table.get_or_create("other", "x", [5])  # another tenant's sessions do not count against "t"
    await first.lock.acquire()  # "a" is the least recently used, but a request is running in it
    try:
        _, evicted = table.get_or_create("t", "c", [6])
        assert [s.session_id for s in evicted] == ["b"]
        _, evicted = table.get_or_create("t", "d", [7])
        assert [s.session_id for s in evicted] == ["c"]
    finally:
        first.lock.release()
    _, evicted = table.get_or_create("t", "e", [8])  # "a" is idle again: now it goes
    assert [s.session_id for s in evicted] == ["a"]
    assert len(table) == 3


async def test_every_session_busy_runs_over_the_cap_instead_of_breaking_a_request():
    table = SessionTable(max_per_tenant=1)
    busy, _ = table.get_or_create("t", "a", [1])
    await busy.lock.acquire()
    try:
        _, evicted = table.get_or_create("t", "b", [2])
        assert evicted == [] and len(table) == 2
    finally:
        busy.lock.release()
