"""model routes: aliases weighted between models, with fallbacks (issue 17)

Also usage by hour, route and team: the usage table gains `hour`, `route` and `team`, and its unique
key becomes (day, hour, key, model, route). Rows from before keep hour 0 and no route.

Revision ID: 0011
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa


revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_routes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=True),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("fallbacks", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_model_routes_name"),
        sqlite_autoincrement=True, mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
    )
    with op.batch_alter_table("model_routes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_routes_team"), ["team"], unique=False)
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hour", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("route", sa.String(length=100), server_default="", nullable=False))
        batch_op.add_column(sa.Column("team", sa.String(length=100), server_default="", nullable=False))
        batch_op.drop_constraint("uq_usage_day_key_model", type_="unique")
        batch_op.create_unique_constraint("uq_usage_hour_key_model_route",
                                          ["day", "hour", "api_key_id", "model_name", "route"])


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_constraint("uq_usage_hour_key_model_route", type_="unique")
        batch_op.create_unique_constraint("uq_usage_day_key_model", ["day", "api_key_id", "model_name"])
        batch_op.drop_column("team")
        batch_op.drop_column("route")
        batch_op.drop_column("hour")
    with op.batch_alter_table("model_routes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_routes_team"))
    op.drop_table("model_routes")
