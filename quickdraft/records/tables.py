"""The tables. Changing them means a new Alembic revision under ``migrations/versions``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RequestRow(Base):
    """One Generate call through the proxy, finished or refused."""

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    session_id: Mapped[str] = mapped_column(String(200))
    route: Mapped[str] = mapped_column(String(200))            # the model that served it
    drafter: Mapped[str] = mapped_column(String(40))           # "none" when speculation was off
    status: Mapped[str] = mapped_column(String(40))            # "OK" or the gRPC status name
    finish_reason: Mapped[str] = mapped_column(String(20))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    verification_steps: Mapped[int] = mapped_column(Integer)
    drafted_tokens: Mapped[int] = mapped_column(Integer)
    accepted_draft_tokens: Mapped[int] = mapped_column(Integer)
    reused_prompt_tokens: Mapped[int] = mapped_column(Integer)
    prefilled_tokens: Mapped[int] = mapped_column(Integer)
    worker_failovers: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)


class RunRow(Base):
    """One replay or benchmark run and the figures it reported."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)  # replay-oracle, replay-live, bench-e2e, ...
    command: Mapped[str] = mapped_column(String(2000))
    host: Mapped[str] = mapped_column(String(200))
    figures: Mapped[dict] = mapped_column(JSON)
