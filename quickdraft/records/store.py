"""Writing and reading the records; the schema comes from the Alembic migrations, never create_all."""

from __future__ import annotations

import dataclasses
import pathlib
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from quickdraft.records.tables import RequestRow, RunRow

MIGRATIONS = pathlib.Path(__file__).with_name("migrations")


@dataclass(slots=True)
class RequestRecord:
    tenant: str
    session_id: str
    route: str
    drafter: str
    status: str = "OK"
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    verification_steps: int = 0
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    reused_prompt_tokens: int = 0
    prefilled_tokens: int = 0
    worker_failovers: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(slots=True)
class RunRecord:
    kind: str
    command: str
    figures: dict
    host: str = field(default_factory=socket.gethostname)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: int | None = None


def normalise_url(url: str) -> str:
    """Expand ``~`` in SQLite paths and create their folder; use psycopg 3 for plain postgresql:// URLs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = pathlib.Path(parsed.database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        parsed = parsed.set(database=str(path))
    elif parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class RecordStore:
    """Requests and runs in SQL: SQLite by default, PostgreSQL (or any SQLAlchemy URL) by URL."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------
    def _alembic(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def migrate(self) -> str:
        """Bring the schema to the newest revision (idempotent); returns that revision."""
        cfg = self._alembic()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return self.revision() or ""

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic()).get_current_head()

    # -- writing -------------------------------------------------------------------
    def add_requests(self, records: list[RequestRecord]) -> None:
        with Session(self.engine) as db, db.begin():
            db.add_all(RequestRow(**dataclasses.asdict(r)) for r in records)

    def add_run(self, record: RunRecord) -> int:
        values = dataclasses.asdict(record)
        values.pop("id")
        with Session(self.engine) as db, db.begin():
            row = RunRow(**values)
            db.add(row)
            db.flush()
            record.id = row.id
        return record.id

    # -- reading -------------------------------------------------------------------
    def recent_requests(self, limit: int = 20, tenant: str | None = None) -> list[RequestRecord]:
        query = select(RequestRow).order_by(RequestRow.id.desc()).limit(limit)
        if tenant is not None:
            query = query.where(RequestRow.tenant == tenant)
        names = [f.name for f in dataclasses.fields(RequestRecord)]
        with Session(self.engine) as db:
            return [RequestRecord(**{n: _utc(getattr(row, n)) for n in names}) for row in db.scalars(query)]

    def recent_runs(self, limit: int = 20, kind: str | None = None) -> list[RunRecord]:
        query = select(RunRow).order_by(RunRow.id.desc()).limit(limit)
        if kind is not None:
            query = query.where(RunRow.kind == kind)
        with Session(self.engine) as db:
            return [RunRecord(kind=r.kind, command=r.command, figures=r.figures, host=r.host,
                              created_at=_utc(r.created_at), id=r.id) for r in db.scalars(query)]


def _utc(value):
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
