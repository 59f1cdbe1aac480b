"""teams and roles: users get a role (admin, operator, member, viewer) and can be disabled, teams own models (by name) and secrets

Revision ID: 0007
Revises: 0006
"""
from datetime import UTC, datetime

from alembic import op
import sqlalchemy as sa


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLE = {"sqlite_autoincrement": True, "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_teams_name"),
        **TABLE,
    )
    op.create_table(
        "team_members",
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "user_id"),
        mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
    )
    with op.batch_alter_table("team_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_team_members_user_id"), ["user_id"], unique=False)
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["team"], ["teams.name"], name="fk_secrets_team", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("team", "name", name="uq_secrets_team_name"),
        **TABLE,
    )

    # Everything that exists belongs to the `default` team; every user who is not an admin is a member of it.
    # (A new, empty database gets that team with its first admin, when the server starts: a database
    # migrated only to be copied into stays empty.)
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM users")).scalar_one():
        now = datetime.now(UTC).replace(tzinfo=None)
        bind.execute(sa.text("INSERT INTO teams (name, created_at, updated_at) VALUES ('default', :now, :now)"),
                     {"now": now})
    default = "(SELECT id FROM teams WHERE name = 'default')"

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default="member"))
        batch_op.add_column(sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE users SET role = 'admin' WHERE is_admin = " + ("1" if _numeric_bool() else "true"))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("is_admin")
    op.execute("INSERT INTO team_members (team_id, user_id, role, created_at) "
               f"SELECT {default}, id, 'member', created_at FROM users WHERE role <> 'admin'")

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team", sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f("ix_models_team"), ["team"], unique=False)
        batch_op.create_foreign_key("fk_models_team", "teams", ["team"], ["name"])
    op.execute("UPDATE models SET team = 'default'")
    # Instances carry their model's team: permission checks and the watch's filter read one row.
    with op.batch_alter_table("model_instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team", sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f("ix_model_instances_team"), ["team"], unique=False)
    op.execute("UPDATE model_instances SET team = 'default'")
    op.add_column("events", sa.Column("team", sa.String(length=100), nullable=True))
    op.execute("UPDATE events SET team = 'default' WHERE kind IN ('models', 'instances')")


def _numeric_bool() -> bool:
    return op.get_bind().dialect.name in ("sqlite", "mysql", "mariadb")


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("team")
    with op.batch_alter_table("model_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_instances_team"))
        batch_op.drop_column("team")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_constraint("fk_models_team", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_models_team"))
        batch_op.drop_column("team")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE users SET is_admin = " + ("1" if _numeric_bool() else "true") + " WHERE role = 'admin'")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("disabled")
        batch_op.drop_column("role")
    op.drop_table("secrets")
    with op.batch_alter_table("team_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_team_members_user_id"))
    op.drop_table("team_members")
    op.drop_table("teams")
