"""api key scopes and gateway usage

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 00:49:47.396950
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('api_key_name', sa.String(length=100), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('model_name', sa.String(length=100), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('day', 'api_key_id', 'model_name', name='uq_usage_day_key_model'),
    sqlite_autoincrement=True, mysql_charset='utf8mb4', mysql_collate='utf8mb4_bin'
    )
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_day'), ['day'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        # Existing keys keep full rights and every model.
        batch_op.add_column(sa.Column('scopes', sa.JSON(), nullable=False,
                                      server_default=_literal('["management", "inference"]')))
        batch_op.add_column(sa.Column('allowed_models', sa.JSON(), nullable=False, server_default=_literal('[]')))


def _literal(value: str):
    # MySQL takes a default for a JSON or TEXT column only as an expression in parentheses.
    if op.get_bind().dialect.name == 'mysql':
        return sa.text("('" + value + "')")
    return value


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('allowed_models')
        batch_op.drop_column('scopes')

    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_user_id'))
        batch_op.drop_index(batch_op.f('ix_usage_day'))

    op.drop_table('usage')
