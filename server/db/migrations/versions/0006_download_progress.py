"""download progress: how far an instance's model or image download has come (0..1)

Revision ID: 0006
Revises: 0005a
"""
from alembic import op
import sqlalchemy as sa


revision = "0006"
down_revision = "0005a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: a plain ALTER TABLE ADD COLUMN on PostgreSQL, SQLite and MariaDB.
    op.add_column("model_instances", sa.Column("download_progress", sa.Float(), nullable=True))


def downgrade() -> None:
    # SQLite drops a column only through a table copy, which batch mode does.
    with op.batch_alter_table("model_instances", schema=None) as batch_op:
        batch_op.drop_column("download_progress")
