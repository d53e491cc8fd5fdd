"""SQL records on both databases: the schema from Alembic, requests written by a real proxy, runs by the CLI."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import sqlalchemy
from conftest import free_port, start, stop, trace_files
from test_cli_and_replay import quickdraft

from quickdraft.cli import wait_serving
from quickdraft.client import QuickDraftClient
from quickdraft.records import RecordStore, RequestRecord, RunRecord

KEYS = {"key-rec": "tenant-rec"}


def test_migrations_build_the_schema_once(database_url):
    store = RecordStore(database_url)
    try:
        assert store.revision() is None
        assert store.migrate() == store.head() == "0001"
        assert store.migrate() == "0001"  # a second upgrade changes nothing
        tables = set(sqlalchemy.inspect(store.engine).get_table_names())
        assert {"requests", "runs", "alembic_version"} <= tables
    finally:
        store.close()


def test_records_round_trip(database_url):
    store = RecordStore(database_url)
    store.migrate()
    try:
        store.add_requests([
            RequestRecord("t1", "s1", "smollm2-135m", "suffix", completion_tokens=40, verification_steps=16,
                          ttft_ms=12.5),
            RequestRecord("t2", "s2", "auto", "", status="INVALID_ARGUMENT"),
        ])
        run_id = store.add_run(RunRecord("replay-oracle", "quickdraft replay x --oracle",
                                         {"tokens_per_step": 2.5, "nested": {"a": [1, 2]}}))
        newest, older = store.recent_requests()
        assert (newest.tenant, newest.status) == ("t2", "INVALID_ARGUMENT")
        assert (older.completion_tokens, older.verification_steps, older.ttft_ms) == (40, 16, 12.5)
        assert [r.tenant for r in store.recent_requests(tenant="t1")] == ["t1"]
        (run,) = store.recent_runs(kind="replay-oracle")
        assert run.id == run_id and run.figures == {"tokens_per_step": 2.5, "nested": {"a": [1, 2]}}
        assert run.created_at.tzinfo is not None
    finally:
        store.close()


@pytest.mark.model
def test_the_proxy_records_every_request(database_url, worker_address, tmp_path):
    port = free_port()
    log = tmp_path / "proxy.log"
    proc = start(["serve", "--worker", worker_address, "--grpc-port", str(port)], log,
                 env={"QUICKDRAFT_DATABASE_URL": database_url, "QUICKDRAFT_API_KEYS": json.dumps(KEYS),
                      "QUICKDRAFT_LOG_FORMAT": "json"})
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=120, proc=proc)
        with QuickDraftClient(address, api_key="key-rec") as c:
            done = c.generate([{"role": "user", "content": "Say hello."}], max_tokens=8, session_id="rec-1")
            with pytest.raises(grpc.RpcError) as refused:
                c.generate([{"role": "user", "content": "x"}], max_tokens=8, drafter="magic", session_id="rec-2")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        store = RecordStore(database_url)
        deadline = time.monotonic() + 15
        while len(rows := store.recent_requests()) < 2:
            assert time.monotonic() < deadline, f"records not written:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        refused_row, ok_row = rows
        u = done.usage
        assert (ok_row.tenant, ok_row.session_id, ok_row.status, ok_row.route, ok_row.drafter) == \
            ("tenant-rec", "rec-1", "OK", u.route, u.drafter)
        assert (ok_row.prompt_tokens, ok_row.completion_tokens, ok_row.verification_steps, ok_row.drafted_tokens,
                ok_row.accepted_draft_tokens) == (u.prompt_tokens, u.completion_tokens, u.verification_steps,
                                                  u.drafted_tokens, u.accepted_draft_tokens)
        assert ok_row.ttft_ms == pytest.approx(u.time_to_first_token_ms)
        assert (refused_row.tenant, refused_row.session_id, refused_row.status) == \
            ("tenant-rec", "rec-2", "INVALID_ARGUMENT")
        store.close()
        # Structured logs: one JSON object per line, the finished request among them with its figures.
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert events and all({"ts", "level", "logger", "message"} <= e.keys() for e in events)
        (done_event,) = [e for e in events if e.get("event") == "request_finished"]
        assert (done_event["tenant"], done_event["session_id"], done_event["completion_tokens"],
                done_event["verification_steps"]) == ("tenant-rec", "rec-1", u.completion_tokens, u.verification_steps)
    finally:
        stop(proc)


def test_a_replay_is_recorded_as_a_run(database_url, tmp_path):
    out = tmp_path / "out.json"
    done = quickdraft("replay", str(trace_files(1)[0]), "--oracle", "--json", str(out),
                      env={"QUICKDRAFT_DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    assert "recorded as run 1 (replay-oracle)" in done.stderr
    listed = quickdraft("records", "runs", "--json", "--database-url", database_url)
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert run["kind"] == "replay-oracle" and run["command"].startswith("quickdraft replay")
    assert run["figures"] == json.loads(out.read_text())
