"""team quotas: GPUs, GPU memory, host RAM and replicas a team's instances may claim (NULL: unlimited)

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: a plain ALTER TABLE ADD COLUMN on PostgreSQL, SQLite and MariaDB.
    op.add_column("teams", sa.Column("quota_gpus", sa.Integer(), nullable=True))
    op.add_column("teams", sa.Column("quota_vram_bytes", sa.BigInteger(), nullable=True))
    op.add_column("teams", sa.Column("quota_ram_bytes", sa.BigInteger(), nullable=True))
    op.add_column("teams", sa.Column("quota_replicas", sa.Integer(), nullable=True))


def downgrade() -> None:
    # SQLite drops a column only through a table copy, which batch mode does.
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("quota_replicas")
        batch_op.drop_column("quota_ram_bytes")
        batch_op.drop_column("quota_vram_bytes")
        batch_op.drop_column("quota_gpus")
