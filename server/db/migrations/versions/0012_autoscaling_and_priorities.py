"""autoscaling, scale to zero and priority classes of models (issue 18)

Revision ID: 0012
Revises: 0011
"""
from alembic import op
import sqlalchemy as sa


revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _empty_text():
    # MySQL takes a default for a TEXT column only as an expression in parentheses.
    return sa.text("('')") if op.get_bind().dialect.name == "mysql" else ""


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        # Existing models stay manual (no max_replicas), of the normal class.
        batch_op.add_column(sa.Column("min_replicas", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_replicas", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("target_concurrency", sa.Integer(), nullable=False, server_default="8"))
        batch_op.add_column(sa.Column("scale_down_delay", sa.Float(), nullable=False, server_default="60"))
        batch_op.add_column(sa.Column("idle_timeout", sa.Float(), nullable=False, server_default="900"))
        batch_op.add_column(sa.Column("cold_start_timeout", sa.Float(), nullable=False, server_default="120"))
        batch_op.add_column(sa.Column("priority", sa.String(length=40), nullable=False, server_default="normal"))
        batch_op.add_column(sa.Column("scale_reason", sa.Text(), nullable=False, server_default=_empty_text()))
        batch_op.add_column(sa.Column("scaled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "gateway_loads",
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("loads", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("server_id"),
        mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
    )


def downgrade() -> None:
    op.drop_table("gateway_loads")
    with op.batch_alter_table("models", schema=None) as batch_op:
        for column in ("scaled_at", "scale_reason", "priority", "cold_start_timeout", "idle_timeout",
                       "scale_down_delay", "target_concurrency", "max_replicas", "min_replicas"):
            batch_op.drop_column(column)
