"""Finding the PostgreSQL server binaries the embedded cluster runs (server/db/embedded.py), and the
error every embedded-PostgreSQL problem is reported with."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

#: Glob patterns searched (highest version first) when initdb/pg_ctl are not on PATH.
PG_BIN_GLOBS: list[str] = ["/usr/lib/postgresql/*/bin"]
#: Plain directories searched after the globs.
PG_BIN_DIRS: list[str] = ["/usr/local/pgsql/bin"]

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

# What to do instead, the last words of every error message.
ALTERNATIVES = "pass --database-url sqlite:///PATH (a local SQLite file) or --database-url postgresql://USER:PASSWORD@HOST:PORT/DB (an external PostgreSQL server)"


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL could not be set up or started.

    The message is a user-facing paragraph that says what went wrong and how to fix it.
    """


def _has_binaries(d: Path) -> bool:
    return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/15/bin -> (15,); non-numeric versions sort last
    parts = re.findall(r"\d+", Path(path).parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def _candidate_bin_dirs() -> list[Path]:
    seen: list[Path] = []

    def add(d: Path) -> None:
        if d not in seen and _has_binaries(d):
            seen.append(d)

    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            add(Path(found).resolve().parent)
    for pattern in PG_BIN_GLOBS:
        for d in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            add(Path(d))
    for d in PG_BIN_DIRS:
        add(Path(d))
    return seen


def _major_version(bin_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "pg_ctl"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    if not m:
        return None
    major = int(m.group(1))
    # before PostgreSQL 10 the major version was "9.6"; PG_VERSION files say so too
    if major < 10:
        m2 = re.search(r"(\d+\.\d+)", out)
        return m2.group(1) if m2 else str(major)
    return str(major)


def find_pg_bin_dir(cluster_version: str | None = None) -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    PATH first, then the highest version under ``/usr/lib/postgresql/*/bin``, then
    ``/usr/local/pgsql/bin``.  With ``cluster_version`` (the ``PG_VERSION`` of an
    existing cluster) the first directory of that major version wins.
    """
    candidates = _candidate_bin_dirs()
    if not candidates:
        raise EmbeddedPostgresError(
            "PostgreSQL server binaries were not found: MaaS-Base runs its own embedded "
            "PostgreSQL by default and needs 'initdb', 'pg_ctl' and 'postgres' (looked on PATH, "
            f"in {', '.join(PG_BIN_GLOBS + PG_BIN_DIRS)}). To fix it, install the PostgreSQL "
            "server: 'apt-get install postgresql' on Debian/Ubuntu ('dnf install postgresql-server' "
            f"on Fedora/RHEL, 'brew install postgresql' on macOS); or {ALTERNATIVES}."
        )
    if cluster_version is None:
        return candidates[0]
    versions = {}
    for d in candidates:
        versions[d] = _major_version(d)
        if versions[d] == cluster_version:
            return d
    found = ", ".join(f"{d} (version {versions[d] or 'unknown'})" for d in candidates)
    raise EmbeddedPostgresError(
        f"The embedded PostgreSQL cluster was created by PostgreSQL {cluster_version}, but only "
        f"other versions of the server binaries were found: {found}. A cluster can only be "
        f"started by its own major version. To fix it, install PostgreSQL {cluster_version} "
        f"(e.g. 'apt-get install postgresql-{cluster_version}') next to the newer one, or "
        f"upgrade the cluster with pg_upgrade, or start with a new --data-dir; or {ALTERNATIVES}."
    )
