"""gateway limits: rate, token, concurrency caps and budgets per key, team and model (issue 17)

`gateway_limits` holds the limits (one row per key, team or model that has any); `gateway_limit_counters`
each server's count per limited subject in the current minute, through which servers sharing a
PostgreSQL hold a limit together (server/gateway/limits.py).

Revision ID: 0010
Revises: 0009
"""
from alembic import op
import sqlalchemy as sa


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_limits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("team", sa.String(length=100), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("rpm", sa.BigInteger(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("max_concurrency", sa.BigInteger(), nullable=True),
        sa.Column("budget_day", sa.BigInteger(), nullable=True),
        sa.Column("budget_month", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name="fk_gateway_limits_api_key",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["team"], ["teams.name"], name="fk_gateway_limits_team", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model"], ["models.name"], name="fk_gateway_limits_model", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("api_key_id", name="uq_gateway_limits_api_key_id"),
        sa.UniqueConstraint("team", name="uq_gateway_limits_team"),
        sa.UniqueConstraint("model", name="uq_gateway_limits_model"),
        sqlite_autoincrement=True, mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
    )
    op.create_table(
        "gateway_limit_counters",
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=100), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("cap_requests", sa.BigInteger(), nullable=False),
        sa.Column("cap_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cap_in_flight", sa.BigInteger(), nullable=False),
        sa.Column("wants", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("server_id", "scope", "subject"),
        mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
    )
    with op.batch_alter_table("gateway_limit_counters", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_limit_counters_updated_at"), ["updated_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("gateway_limit_counters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gateway_limit_counters_updated_at"))
    op.drop_table("gateway_limit_counters")
    op.drop_table("gateway_limits")
