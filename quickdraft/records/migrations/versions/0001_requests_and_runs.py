"""requests and runs

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("session_id", sa.String(200), nullable=False),
        sa.Column("route", sa.String(200), nullable=False),
        sa.Column("drafter", sa.String(40), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("finish_reason", sa.String(20), nullable=False),
        *(sa.Column(name, sa.Integer, nullable=False) for name in (
            "prompt_tokens", "completion_tokens", "verification_steps", "drafted_tokens",
            "accepted_draft_tokens", "reused_prompt_tokens", "prefilled_tokens", "worker_failovers")),
        sa.Column("ttft_ms", sa.Float, nullable=False),
        sa.Column("total_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_requests_created_at", "requests", ["created_at"])
    op.create_index("ix_requests_tenant", "requests", ["tenant"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("command", sa.String(2000), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("figures", sa.JSON, nullable=False),
    )
    op.create_index("ix_runs_created_at", "runs", ["created_at"])
    op.create_index("ix_runs_kind", "runs", ["kind"])


def downgrade() -> None:
    op.drop_table("runs")
    op.drop_table("requests")
