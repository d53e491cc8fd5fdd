"""SQL records of requests and of replay/benchmark runs (SQLAlchemy 2.x, Alembic migrations)."""

from quickdraft.records.store import RecordStore, RequestRecord, RunRecord

__all__ = ["RecordStore", "RequestRecord", "RunRecord"]
