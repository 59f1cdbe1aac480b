"""rollouts and draining

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 01:27:37.091446
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('change', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'revision', name='uq_model_revisions_model_revision'),
    sqlite_autoincrement=True, mysql_charset='utf8mb4', mysql_collate='utf8mb4_bin'
    )
    with op.batch_alter_table('model_revisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_revisions_model_id'), ['model_id'], unique=False)
    # Every existing model's current spec is its first known revision.
    # Built, not written as text: `change` is a reserved word in MySQL and must be quoted there.
    revisions = sa.table('model_revisions', sa.column('model_id'), sa.column('revision'), sa.column('spec'),
                         sa.column('change'), sa.column('created_at'))
    models = sa.table('models', sa.column('id'), sa.column('generation'), sa.column('spec'), sa.column('updated_at'))
    op.execute(revisions.insert().from_select(
        ['model_id', 'revision', 'spec', 'change', 'created_at'],
        sa.select(models.c.id, models.c.generation, models.c.spec, sa.literal('before history was kept'),
                  models.c.updated_at)))

    with op.batch_alter_table('models', schema=None) as batch_op:
        # Existing models: not paused, surge 1, unavailable 0.
        batch_op.add_column(sa.Column('paused', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('max_surge', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('max_unavailable', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('rollout_message', sa.Text(), nullable=False, server_default=_empty_text()))

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('draining', sa.Boolean(), nullable=False, server_default=sa.false()))


def _empty_text():
    # MySQL takes a default for a TEXT column only as an expression in parentheses.
    return sa.text("('')") if op.get_bind().dialect.name == 'mysql' else ''


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('draining')

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('rollout_message')
        batch_op.drop_column('max_unavailable')
        batch_op.drop_column('max_surge')
        batch_op.drop_column('paused')

    with op.batch_alter_table('model_revisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_revisions_model_id'))

    op.drop_table('model_revisions')
