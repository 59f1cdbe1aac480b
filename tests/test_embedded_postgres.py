"""Embedded PostgreSQL (server/db/embedded.py): real initdb/pg_ctl runs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest

from server.db import embedded, pg_binaries
from server.db.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_pg_bin_dir

pytestmark = pytest.mark.postgres

IS_ROOT = os.geteuid() == 0


def _have_binaries() -> bool:
    try:
        find_pg_bin_dir()
        return True
    except EmbeddedPostgresError:
        return False


needs_pg = pytest.mark.skipif(not _have_binaries(), reason="PostgreSQL server binaries not installed")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="only meaningful when running as root")


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(pid, 0)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _cluster_pids(data_dir: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names this cluster, or whose parent
    is the recorded postmaster."""
    master = _postmaster_pid(data_dir)
    needle = str(data_dir / "postgres").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if not _alive(int(entry.name)):
            continue
        if needle in cmdline or (master and ppid == master):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def data_dir():
    # pytest's tmp_path (/tmp/pytest-of-root, 0700) is not traversable by the postgres user
    base = Path(tempfile.mkdtemp(prefix="maas-test-", dir="/tmp"))
    os.chmod(base, 0o711)
    d = base / "data"
    try:
        yield d
    finally:
        # stop whatever the test left running on this cluster, then remove everything
        pid = _postmaster_pid(d)
        if pid and _alive(pid):
            try:
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _cluster_pids(d):
            time.sleep(0.1)
        for p in _cluster_pids(d):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


async def _query(url: str, sql: str, *args):
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(url: str, sql: str, *args):
    return asyncio.run(_query(url, sql, *args))


@needs_pg
def test_first_start_creates_cluster_and_database(data_dir, caplog):
    caplog.set_level(logging.INFO)
    pg = EmbeddedPostgres(data_dir)
    assert pg.url is None
    t0 = time.perf_counter()
    url = pg.start()
    first = time.perf_counter() - t0
    try:
        assert url.startswith("postgresql+asyncpg://maas:")
        assert url.endswith("/maas")
        assert "@127.0.0.1:" in url
        assert pg.url == url
        assert query(url, "select 1")[0][0] == 1
        assert query(url, "select current_database()")[0][0] == "maas"
        assert query(url, "show server_encoding")[0][0] == "UTF8"
        # password kept 0600, owned by us; the initdb pwfile is gone
        pwfile = data_dir / "postgres-password"
        st = pwfile.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert pwfile.read_text().strip() in url
        assert not [p for p in data_dir.iterdir() if p.name.startswith(".initdb-pwfile")]
        assert (data_dir / "postgres" / "PG_VERSION").is_file()
        # unix sockets are off; the server listens on loopback TCP only
        lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
        assert lines[4].strip() == ""
        assert lines[5].strip() == "127.0.0.1"
        assert str(pg.port) == lines[3].strip()
        # a wrong password is refused (scram-sha-256, not trust)
        bad = url.replace(pwfile.read_text().strip(), "wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):
            query(bad, "select 1")
        if IS_ROOT:
            assert (data_dir / "postgres").stat().st_uid == embedded.pwd.getpwnam("postgres").pw_uid
            assert stat.S_IMODE(data_dir.stat().st_mode) & 0o711 == 0o711
            assert any("as user 'postgres'" in r.getMessage() for r in caplog.records) or \
                embedded._logged_root
    finally:
        pg.stop()
    assert pg.url is None
    print(f"\nfirst start (initdb + start + createdb): {first:.2f} s")


@needs_pg
def test_stop_then_start_reuses_cluster_and_data(data_dir):
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    query(url, "create table kept (v text)")
    query(url, "insert into kept values ('hello')")
    version_file = (data_dir / "postgres" / "PG_VERSION").stat()
    pg.stop()
    pid_after_stop = _postmaster_pid(data_dir)
    assert pid_after_stop is None, "postmaster.pid should be gone after stop"
    pg.stop()  # idempotent

    pg2 = EmbeddedPostgres(data_dir)
    t0 = time.perf_counter()
    url2 = pg2.start()
    restart = time.perf_counter() - t0
    try:
        assert (data_dir / "postgres" / "PG_VERSION").stat().st_ino == version_file.st_ino
        assert url2.split("@")[0] == url.split("@")[0]  # same password
        assert [r[0] for r in query(url2, "select v from kept")] == ["hello"]
        assert pg2.start() == url2  # start twice: same URL, nothing new
    finally:
        pg2.stop()
    print(f"\nrestart on existing cluster: {restart:.2f} s")


@needs_pg
def test_second_instance_reuses_running_cluster(data_dir):
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    try:
        pid = _postmaster_pid(data_dir)
        # e.g. the previous server was killed with -9 and left postgres running
        other = EmbeddedPostgres(data_dir)
        url2 = other.start()
        assert url2 == url
        assert other.port == pg.port
        assert _postmaster_pid(data_dir) == pid
        assert query(url2, "select 1")[0][0] == 1
        postmasters = [p for p in _cluster_pids(data_dir) if p == pid]
        assert postmasters == [pid]
    finally:
        pg.stop()


@needs_pg
def test_start_after_kill_9_of_postmaster(data_dir):
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    query(url, "create table t (v int)")
    query(url, "insert into t values (42)")
    pid = _postmaster_pid(data_dir)
    assert pid and _alive(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    # the stale postmaster.pid is still there
    assert _postmaster_pid(data_dir) == pid

    pg2 = EmbeddedPostgres(data_dir)
    url2 = pg2.start()
    try:
        new_pid = _postmaster_pid(data_dir)
        assert new_pid and new_pid != pid and _alive(new_pid)
        assert [r[0] for r in query(url2, "select v from t")] == [42]  # crash recovery kept it
    finally:
        pg2.stop()
    pg.stop()  # the first instance's cluster is gone: still no error


@needs_pg
def test_stale_pidfile_with_foreign_pid_does_not_block(data_dir):
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    pidfile = data_dir / "postgres" / "postmaster.pid"
    pid = _postmaster_pid(data_dir)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)
    # after a reboot the old PID may belong to an unrelated program: use our own PID
    lines = pidfile.read_text().splitlines()
    lines[0] = str(os.getpid())
    pidfile.write_text("\n".join(lines) + "\n")
    pg2 = EmbeddedPostgres(data_dir)
    url2 = pg2.start()
    try:
        assert query(url2, "select 1")[0][0] == 1
        assert _postmaster_pid(data_dir) != os.getpid()
    finally:
        pg2.stop()
    del url


def test_stop_without_start_is_a_no_op(data_dir):
    pg = EmbeddedPostgres(data_dir)
    pg.stop()
    pg.stop()
    assert pg.url is None


def test_missing_binaries_says_how_to_install(data_dir, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(pg_binaries, "PG_BIN_GLOBS", [str(tmp_path / "nothing" / "*" / "bin")])
    monkeypatch.setattr(pg_binaries, "PG_BIN_DIRS", [str(tmp_path / "nothing-either")])
    with pytest.raises(EmbeddedPostgresError) as ei:
        EmbeddedPostgres(data_dir).start()
    msg = str(ei.value)
    assert "install" in msg
    assert "apt-get install postgresql" in msg
    assert "--database-url sqlite:///" in msg
    assert "postgresql://" in msg
    assert "not found" in msg


@needs_root
def test_root_without_postgres_user_explains(data_dir, monkeypatch):
    monkeypatch.setattr(embedded, "POSTGRES_OS_USER", "no-such-user-maas-test")
    with pytest.raises(EmbeddedPostgresError) as ei:
        EmbeddedPostgres(data_dir).start()
    msg = str(ei.value)
    assert "no-such-user-maas-test" in msg
    assert "non-root" in msg and "--database-url" in msg


@needs_root
def test_root_untraversable_ancestor_is_named(data_dir):
    blocker = data_dir.parent / "private"
    blocker.mkdir(mode=0o700)
    os.chmod(blocker, 0o700)
    with pytest.raises(EmbeddedPostgresError) as ei:
        EmbeddedPostgres(blocker / "deeper" / "data").start()
    msg = str(ei.value)
    assert str(blocker) in msg
    assert "--data-dir" in msg and "/var/lib/maas" in msg


@needs_pg
@needs_root
def test_root_falls_back_to_su_without_runuser(data_dir, monkeypatch):
    real_which = shutil.which

    def which(name, *args, **kwargs):
        return None if name == "runuser" else real_which(name, *args, **kwargs)

    monkeypatch.setattr(embedded.shutil, "which", which)
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    try:
        assert query(url, "select current_user")[0][0] == "maas"
    finally:
        pg.stop()
    assert _postmaster_pid(data_dir) is None


@needs_pg
def test_stop_leaves_a_reused_cluster_running(data_dir):
    pg = EmbeddedPostgres(data_dir)
    url = pg.start()
    try:
        pid = _postmaster_pid(data_dir)
        other = EmbeddedPostgres(data_dir)
        assert other.start() == url and other.reused
        other.stop()  # it only borrowed the cluster: let go, not stopped
        assert other.url is None and _postmaster_pid(data_dir) == pid and _alive(pid)
        assert query(url, "select 1")[0][0] == 1
    finally:
        pg.stop()
    assert not _alive(pid)  # the one that started it stops it


def _maas_start(data_dir: Path, port: int, log: Path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_CONFIG": os.devnull}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "maas_tui", "start", "--no-agent", "--data-dir", str(data_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _healthy(port: int, process, log: Path, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server not healthy in {timeout:g} s:\n{log.read_text(errors='replace')[-3000:]}")


def _files(data_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of the server's own in the data folder (PostgreSQL's files move by themselves)."""
    return {str(p.relative_to(data_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in data_dir.rglob("*") if p.is_file() and "postgres" not in p.relative_to(data_dir).parts[0]}


@needs_pg
def test_second_maas_start_on_a_live_data_folder_exits_2_and_touches_nothing(data_dir):
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    log = data_dir.parent / "first.log"
    first = _maas_start(data_dir, port, log)
    try:
        _healthy(port, first, log)
        pid = _postmaster_pid(data_dir)
        before = _files(data_dir)
        env = {**os.environ, "MAAS_CONFIG": os.devnull}
        second = subprocess.run([sys.executable, "-m", "maas_tui", "start", "--no-agent", "--data-dir", str(data_dir),
                                 "--port", str(free_port())], capture_output=True, text=True, timeout=60, env=env)
        output = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 2, output
        assert len(output) == 1 and "in use" in output[0] and str(data_dir) in output[0], output
        assert _postmaster_pid(data_dir) == pid and _alive(pid)
        assert _files(data_dir) == before
        _healthy(port, first, log, timeout=5)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        assert not _alive(pid)  # the server that started the cluster stops it
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


@needs_pg
def test_maas_start_never_stops_a_cluster_it_adopted(data_dir):
    from conftest import free_port

    port = free_port()
    log = data_dir.parent / "server.log"
    first = _maas_start(data_dir, port, log)
    second = None
    try:
        _healthy(port, first, log)
        pid = _postmaster_pid(data_dir)
        os.killpg(first.pid, signal.SIGKILL)  # the server dies; its PostgreSQL (a daemon of its own) lives on
        first.wait(10)
        assert _alive(pid)
        second = _maas_start(data_dir, port, log)
        _healthy(port, second, log)
        assert "reused" in log.read_text(errors="replace")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        assert _postmaster_pid(data_dir) == pid and _alive(pid), "a cluster it adopted was stopped"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
