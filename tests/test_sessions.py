"""The proxy's session table: LRU per tenant, and never evicting a session that is serving a request."""

from __future__ import annotations

import asyncio

from quickdraft.proxy.sessions import SessionTable


async def _call(table: SessionTable, tenant: str, session_id: str, prompt: list[int]) -> list[str]:
    """One whole call in a session (as the service runs it); the ids of the sessions it evicted."""
    session, evicted = table.get_or_create(tenant, session_id, prompt)
    async with session.serving():
        session.start_call(prompt)
    return [s.session_id for s in evicted]


async def test_lru_eviction_per_tenant_skips_busy_sessions():
    table = SessionTable(max_per_tenant=2)
    first, _ = table.get_or_create("t", "a", [1, 2])  # "a" is the least recently used, but its call runs on
    async with first.serving():
        await _call(table, "t", "b", [3, 4])
        await _call(table, "other", "x", [5])  # another tenant's sessions do not count against "t"
        assert await _call(table, "t", "c", [6]) == ["b"]
        assert await _call(table, "t", "d", [7]) == ["c"]
    assert await _call(table, "t", "e", [8]) == ["a"]  # "a" is idle again: now it goes
    assert len(table) == 3


async def test_every_session_busy_runs_over_the_cap_instead_of_breaking_a_request():
    table = SessionTable(max_per_tenant=1)
    busy, _ = table.get_or_create("t", "a", [1])
    async with busy.serving():
        other, evicted = table.get_or_create("t", "b", [2])
        assert evicted == [] and len(table) == 2
        async with other.serving():
            pass
    assert await _call(table, "t", "c", [3]) == ["a", "b"]


async def test_a_call_waiting_for_its_session_keeps_it_from_eviction():
    """Between one call's end and the wake-up of the next call waiting for the same session, the
    session's lock reads free; a third call must still not evict it (the waiting call would then
    run in a session the table no longer holds, beside a new one of the same id)."""
    table = SessionTable(max_per_tenant=1)
    first, _ = table.get_or_create("t", "a", [1])
    entered = asyncio.Event()
    turn = first.serving()
    await turn.__aenter__()
    second, _ = table.get_or_create("t", "a", [1, 2])  # the agent's next call, same session id
    assert second is first

    async def waits() -> None:
        async with second.serving():
            entered.set()

    waiting = asyncio.create_task(waits())
    await asyncio.sleep(0)  # it waits for the lock
    await turn.__aexit__(None, None, None)
    assert not first.lock.locked() and not entered.is_set()  # released, the waiter not yet awake
    _, evicted = table.get_or_create("t", "c", [9])
    assert evicted == []
    await waiting
    assert entered.is_set() and first.users == 0
    assert [s.session_id for s in table.get_or_create("t", "d", [10])[1]] == ["a"]


async def test_a_call_without_an_id_does_not_join_a_session_in_use():
    table = SessionTable()
    running, _ = table.get_or_create("t", "a", [1, 2, 3])
    async with running.serving():
        running.start_call([1, 2, 3])
        joined, _ = table.get_or_create("t", "", [1, 2, 3, 4])
        assert joined is not running
        async with joined.serving():
            pass
    again, _ = table.get_or_create("t", "", [1, 2, 3, 4, 5])
    assert again is running
