"""gateway limits: servers share a limit by demand (issue 17)

`gateway_limit_counters.demand` (the requests that asked for a limited key, team or model on a server
since its last exchange, admitted or refused) replaces `wants` (whether it was refused for want of its
part): the servers' parts of a limit follow their demand (server/gateway/limit_exchange.py). The rows
are live counts, rewritten every second: nothing to carry over.

Revision ID: 0015
Revises: 0014
"""
from alembic import op
import sqlalchemy as sa


revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_limit_counters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("demand", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.drop_column("wants")


def downgrade() -> None:
    with op.batch_alter_table("gateway_limit_counters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wants", sa.Integer(), nullable=False, server_default="0"))
        batch_op.drop_column("demand")
