"""What the embedded PostgreSQL (server/db/embedded.py) says when it fails: one user-facing paragraph per
way it can fail, saying what went wrong and how to fix it, each ending with the alternatives (SQLite, an
external PostgreSQL). Every function returns the error for the caller to raise."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

from server.db.pg_binaries import ALTERNATIVES, EmbeddedPostgresError

LOG_TAIL_LINES = 20


def tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    """The last `n` non-blank lines of a program's output or a log."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def no_postgres_user(user: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        "PostgreSQL refuses to run as root, and this process is root, so the embedded "
        f"PostgreSQL would run as the unprivileged user '{user}', but no "
        "such user exists on this machine (MaaS-Base never creates system users by "
        f"itself). To fix it, create one (e.g. 'useradd --system --home-dir "
        f"/var/lib/postgresql --shell /usr/sbin/nologin {user}'; installing "
        "the 'postgresql' package also creates it), or run MaaS-Base as a non-root "
        f"user; or {ALTERNATIVES}."
    )


def data_dir_not_created(data_dir: Path, error: OSError) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"Could not create the data directory {data_dir}: {error.strerror}. "
        "Choose a writable location with --data-dir (e.g. /var/lib/maas or ~/.local/share/maas)."
    )


def data_dir_not_traversable(user: str, data_dir: Path, parent: Path) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL runs as user '{user}' (this process is root), "
        f"and that user cannot reach the data directory {data_dir} because "
        f"{parent} is not traversable by it (mode "
        f"{stat.filemode(parent.stat().st_mode)}; it needs o+x). To fix it, use a "
        "data directory that other users can traverse, e.g. --data-dir /var/lib/maas, "
        f"or allow traversal with 'chmod o+x {parent}'; or {ALTERNATIVES}."
    )


def did_not_stop(cluster_dir: Path, output: str, log_tail: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL in {cluster_dir} did not stop: "
        f"{tail(output, 5) or 'pg_ctl stop failed'}. Stop it by hand with "
        f"'pg_ctl stop -D {cluster_dir} -m immediate' (as the user that owns "
        f"the directory).\n{log_tail}"
    )


def command_timed_out(argv: list[str], timeout: float, cluster_dir: Path, log_tail: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The command {shlex.join(argv)} did not finish within {timeout:.0f} s while "
        f"setting up the embedded PostgreSQL in {cluster_dir}. Check the machine's "
        f"load and disk, then try again; or {ALTERNATIVES}.\n{log_tail}"
    )


def command_not_run(program: str, error: OSError) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"Could not run {program} for the embedded PostgreSQL: {error}. "
        f"Check the PostgreSQL installation; or {ALTERNATIVES}."
    )


def password_missing(cluster_dir: Path, password_file: Path) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL cluster in {cluster_dir} exists, but its password "
        f"file {password_file} is missing or empty, so MaaS-Base cannot log in. To fix "
        "it, restore that file (one line: the password of the 'maas' database user), or "
        f"move {cluster_dir} away to start with a new, empty database; or {ALTERNATIVES}."
    )


def cluster_dir_not_empty(cluster_dir: Path) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The directory {cluster_dir} is not empty but holds no PostgreSQL cluster "
        "(no PG_VERSION file), so the embedded PostgreSQL cannot create its cluster there. "
        f"To fix it, move that directory away or empty it, or choose another --data-dir; "
        f"or {ALTERNATIVES}."
    )


def initdb_failed(cluster_dir: Path, returncode: int, output: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"Creating the embedded PostgreSQL cluster in {cluster_dir} failed (initdb "
        f"exit status {returncode}). Check that the disk has space and that the "
        f"directory is writable by the user running PostgreSQL, then try again; or {ALTERNATIVES}.\n"
        f"initdb output:\n{tail(output)}"
    )


def running_not_ready(pid: int, cluster_dir: Path, timeout: float, state: str, log_tail: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"A PostgreSQL server (PID {pid}) is running on {cluster_dir} but did not "
        f"become ready on 127.0.0.1 within {timeout} s (state "
        f"'{state or 'unknown'}'). Stop it with 'pg_ctl stop -D {cluster_dir} -m "
        f"fast' (as the owner of that directory) and start MaaS-Base again; or {ALTERNATIVES}.\n"
        f"{log_tail}"
    )


def did_not_start(cluster_dir: Path, returncode: int, log_file: Path, output: str,
                  log_tail: str) -> EmbeddedPostgresError:
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL in {cluster_dir} did not start (pg_ctl exit status "
        f"{returncode}). The most common causes are a full disk, a cluster directory "
        "that was copied or has the wrong owner, or another PostgreSQL already using this "
        f"directory. See the log below and {log_file}; fix the cause and start again, "
        f"or choose another --data-dir; or {ALTERNATIVES}.\n"
        f"pg_ctl output:\n{tail(output, 5)}\n{log_tail}"
    )


def database_not_ready(port: int, database: str, problem: str, password_file: Path, cluster_dir: Path,
                       log_tail: str | None = None) -> EmbeddedPostgresError:
    """The cluster runs but its database could not be checked or created (`log_tail` when psql said why)."""
    return EmbeddedPostgresError(
        f"The embedded PostgreSQL started on 127.0.0.1:{port}, but the database "
        f"'{database}' could not be checked or created: {problem}. If the "
        f"password in {password_file} no longer matches the cluster, restore it or move "
        f"{cluster_dir} away to start afresh; or {ALTERNATIVES}." + ("" if log_tail is None else f"\n{log_tail}")
    )
