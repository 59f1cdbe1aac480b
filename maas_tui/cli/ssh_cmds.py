"""`maas user ...` (users and their SSH keys) and `maas ssh serve` (the TUI over SSH)."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path
from typing import Optional

import typer

from maas_tui.cli.inputs import InputProblem, port_option, read_input_file, server_url as checked_url, url_callback
from maas_tui.cli.output import Format, OutputOption, age, console, emit, print_error

user_app = typer.Typer(help="Users and the SSH keys that let them into the TUI over SSH.", no_args_is_help=True)
ssh_app = typer.Typer(help="Serve the TUI over SSH.", no_args_is_help=True)
session_app = typer.Typer(help="Login sessions: list and revoke them.", no_args_is_help=True)

KEY_COLUMNS = [("NAME", lambda k: k.name), ("FINGERPRINT", lambda k: k.fingerprint),
               ("LAST USED", lambda k: age(k.last_used_at) if k.last_used_at else "never"),
               ("AGE", lambda k: age(k.created_at))]
USER_COLUMNS = [("NAME", lambda u: u.username), ("ROLE", lambda u: u.role),
                ("AGE", lambda u: age(u.created_at))]


def register(app: typer.Typer) -> None:
    app.add_typer(user_app, name="user")
    app.add_typer(ssh_app, name="ssh")
    app.add_typer(session_app, name="session")
    for group in app.registered_groups:  # `maas worker add` joins the existing worker group
        if group.name == "worker" and group.typer_instance is not None:
            group.typer_instance.command("add")(worker_add)
            group.typer_instance.command("uninstall")(worker_uninstall)


def _call(work):  # late import: main imports this module
    from maas_tui.cli.main import call

    return call(work)


@user_app.command("add-key")
def user_add_key(name: str = typer.Argument(..., help="the user"),
                 key_file: Path = typer.Option(..., "--key-file", help="an OpenSSH public key, e.g. ~/.ssh/id_ed25519.pub"),
                 key_name: str = typer.Option("", "--name", help="what to call the key (default: its comment)"),
                 output: Format = OutputOption) -> None:
    """Let a public key log in as NAME (`ssh -p 2222 NAME@server`)."""
    try:
        text, _ = read_input_file(key_file, limit=64 * 1024)  # a public key line is well under 16 KiB
    except InputProblem as exc:
        print_error(exc.message)
        raise typer.Exit(exc.code) from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        print_error(f"{key_file} must hold exactly one public key line")
        raise typer.Exit(2)
    key = _call(lambda c: c.add_ssh_key(name, lines[0], key_name))
    emit(key, output, KEY_COLUMNS)


@user_app.command("keys")
def user_keys(name: str = typer.Argument(..., help="the user"), output: Format = OutputOption) -> None:
    """List the SSH keys of a user."""
    emit(_call(lambda c: c.list_ssh_keys(name)), output, KEY_COLUMNS)


@user_app.command("remove-key")
def user_remove_key(name: str = typer.Argument(..., help="the user"),
                    key: str = typer.Argument(..., help="fingerprint (SHA256:...), name or id")) -> None:
    """Stop a public key from logging in."""
    _call(lambda c: c.delete_ssh_key(name, key))
    console.print(f"removed SSH key {key} of {name}", highlight=False)


@user_app.command("list")
def user_list(output: Format = OutputOption) -> None:
    """List users (admin)."""
    emit(_call(lambda c: c.list_users()), output, USER_COLUMNS)


@user_app.command("create")
def user_create(name: str = typer.Argument(..., help="lower-case user name"),
                password: Optional[str] = typer.Option(None, help="prompted when missing"),
                role: str = typer.Option("member", help="admin, operator, member or viewer"),
                team: list[str] = typer.Option([], "--team", help="a team to join (repeatable; default: default)"),
                output: Format = OutputOption) -> None:
    """Create a user (admin). Members and viewers join their teams with their role."""
    secret = password if password is not None else getpass.getpass(f"password for {name}: ")
    emit(_call(lambda c: c.create_user(name, secret, role, team or None)), output, USER_COLUMNS)


@user_app.command("set-role")
def user_set_role(name: str = typer.Argument(..., help="the user"),
                  role: str = typer.Argument(..., help="admin, operator, member or viewer"),
                  output: Format = OutputOption) -> None:
    """Change a user's role (admin); their keys and sessions follow at once, on every server."""
    emit(_call(lambda c: c.update_user(name, role=role)), output, USER_COLUMNS)


@user_app.command("disable")
def user_disable(name: str = typer.Argument(..., help="the user"), output: Format = OutputOption) -> None:
    """Disable a user (admin): their keys and sessions stop at once, on every server."""
    emit(_call(lambda c: c.update_user(name, disabled=True)), output, USER_COLUMNS)


@user_app.command("enable")
def user_enable(name: str = typer.Argument(..., help="the user"), output: Format = OutputOption) -> None:
    """Enable a disabled user again (admin); revoked sessions stay revoked, keys work again."""
    emit(_call(lambda c: c.update_user(name, disabled=False)), output, USER_COLUMNS)


@user_app.command("delete")
def user_delete(name: str = typer.Argument(..., help="the user")) -> None:
    """Delete a user with their keys, sessions and SSH keys (admin)."""
    _call(lambda c: c.delete_user(name))
    console.print(f"user {name} deleted")


SESSION_COLUMNS = [("PREFIX", lambda s: s.prefix), ("USER", lambda s: s.username), ("KIND", lambda s: s.kind),
                   ("CREATED", lambda s: age(s.created_at)), ("EXPIRES", lambda s: str(s.expires_at or "-")),
                   ("LAST USED", lambda s: age(s.last_used_at) if s.last_used_at else "-")]


@session_app.command("list")
def session_list(all_users: bool = typer.Option(False, "--all", help="every user's sessions (admin)"),
                 output: Format = OutputOption) -> None:
    """List login sessions (yours; --all: everyone's)."""
    emit(_call(lambda c: c.list_sessions(all_users)), output, SESSION_COLUMNS)


@session_app.command("revoke")
def session_revoke(prefix: str = typer.Argument(..., help="the session's prefix (maas session list)")) -> None:
    """Revoke a session: yours, or anyone's for admins. It stops at once, on every server."""
    _call(lambda c: c.revoke_session(prefix))
    console.print(f"session {prefix} revoked")


@ssh_app.command("serve")
def ssh_serve(server: Optional[str] = typer.Option(None, help="the server URL (default: the current context)"),
              port: int = port_option(2222, "SSH port"),
              host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"),
              data_dir: Optional[Path] = typer.Option(None, help="where the host key is kept"),
              max_sessions: int = typer.Option(16, min=1, help="concurrent sessions at most"),
              log_level: str = typer.Option("info", help="debug, info, warning or error")) -> None:
    """Serve the TUI to SSH clients, with an admin login (maas login) to mint their sessions."""
    import platformdirs

    from maas_tui import config as client_config
    from maas_tui.cli.serve import _run_until_signal, _setup_logging, _wait_for_signal
    from maas_tui.ssh.server import ApiBackend, SshConfig, TuiFrontDoor

    _setup_logging(log_level)
    config = client_config.load()
    url = server or config.server
    if not url or not config.token:
        print_error("no server or credentials: run 'maas login' as an admin first")
        raise typer.Exit(2)
    try:
        url = checked_url(url)
    except InputProblem as exc:
        print_error(exc.message)
        raise typer.Exit(exc.code) from None
    folder = data_dir or Path(platformdirs.user_data_dir("maas"))

    async def main() -> None:
        backend = ApiBackend(url, config.token)
        door = TuiFrontDoor(backend, SshConfig(host=host, port=port, data_dir=folder, max_sessions=max_sessions))
        try:
            await door.start()
            console.print(f"TUI over SSH on {host}:{door.port} for {url}: ssh -p {door.port} USER@{host}",
                          highlight=False)
            await _wait_for_signal()
        finally:
            await door.stop()
            await backend.close()

    try:
        _run_until_signal(main())
    except OSError as exc:
        print_error(f"cannot serve SSH on {host}:{port}: {exc.strerror or exc}")
        raise typer.Exit(1) from None


def worker_add(target: str = typer.Argument(..., help="user@host or user@host:port"),
               token: str = typer.Option(..., envvar="MAAS_TOKEN", help="the cluster token (<data-dir>/token on the server)"),
               identity: Optional[Path] = typer.Option(None, help="SSH private key (default: your agent and ~/.ssh keys)"),
               port: int = port_option(22, "SSH port", flag="--port"),
               name: Optional[str] = typer.Option(None, help="worker name (default: the remote host name)"),
               address: Optional[str] = typer.Option(None, help="address the server uses to reach the worker (default: host)"),
               server_url: Optional[str] = typer.Option(None, callback=url_callback,
                                                        help="the server URL as the worker sees it (default: the context's)"),
               simulate_gpus: Optional[str] = typer.Option(None, help="simulated GPUs, e.g. 4xH100-80GB"),
               labels: list[str] = typer.Option([], "--labels", help="worker labels k=v[,k=v] (repeatable)"),
               remote_dir: str = typer.Option("~/.maas", help="where the agent lives on the remote host"),
               venv: Optional[str] = typer.Option(None, help="the remote venv (default: <remote-dir>/venv)"),
               pip_arg: list[str] = typer.Option([], "--pip-arg", help="extra pip install arguments (repeatable)"),
               no_host_key_check: bool = typer.Option(False, "--no-host-key-check", help="accept any host key (labs only)"),
               supervisor: str = typer.Option("auto", help="auto (systemd when it runs and the user is root), systemd or process"),
               timeout: float = typer.Option(120, help="seconds to wait for the worker to be ready")) -> None:
    """Bootstrap an agent on a remote host over SSH (same version, supervised), and wait until it is ready."""
    from maas_tui import config as client_config
    from maas_tui.cli.main import fail
    from maas_tui.client import ApiClientError, MaasClient
    from maas_tui.cli.serve import parse_labels
    from maas_tui.ssh.bootstrap import AgentPlan, BootstrapError, bootstrap

    if supervisor not in ("auto", "systemd", "process"):
        print_error("--supervisor must be auto, systemd or process")
        raise typer.Exit(2)
    where = _target(target, port, identity, no_host_key_check)
    try:
        worker_labels = parse_labels(labels)
    except ValueError as exc:
        print_error(f"--labels: {exc}")
        raise typer.Exit(2) from None
    config = client_config.load()
    if not config.server:
        fail("no server configured: run 'maas login --server URL ...' or set MAAS_SERVER")

    async def main() -> str:
        async with MaasClient(config.server, config.token) as client:
            worker_name = name
            if worker_name is None:
                import asyncssh

                options = {"username": where.user, "port": where.port, **({"client_keys": [where.identity]}
                                                                           if where.identity else {})}
                if where.known_hosts is None:
                    options["known_hosts"] = None
                async with asyncssh.connect(where.host, **options) as conn:
                    worker_name = str((await conn.run("hostname", check=True)).stdout).strip()
            plan = AgentPlan(server_url=(server_url or config.server).rstrip("/"), cluster_token=token,
                             name=worker_name, address=address or where.host, remote_dir=remote_dir,
                             venv=venv or "", simulate_gpus=simulate_gpus, labels=worker_labels, pip_args=list(pip_arg),
                             supervisor=supervisor)

            async def ready() -> None:
                deadline = asyncio.get_running_loop().time() + timeout
                while True:
                    try:
                        if (await client.get_worker(worker_name)).state == "ready":
                            console.print(f"worker {worker_name} is ready", highlight=False)
                            return
                    except ApiClientError as exc:
                        if exc.status != 404:
                            raise
                    if asyncio.get_running_loop().time() > deadline:
                        raise BootstrapError(f"worker {worker_name} not ready after {timeout:g} s "
                                             f"(see {remote_dir}/agent.log on {where.host})")
                    await asyncio.sleep(0.5)

            return await bootstrap(where, plan, ready, say=lambda m: console.print(m, highlight=False))

    try:
        asyncio.run(main())
    except (BootstrapError, ApiClientError, OSError) as exc:
        fail(str(getattr(exc, "message", "") or exc))
    except Exception as exc:  # asyncssh errors: refused key, host key mismatch
        fail(f"{type(exc).__name__}: {exc}")


def _target(target: str, port: int, identity: Optional[Path], no_host_key_check: bool):
    """user@host[:port] and the connection options; a bad target is a usage error (exit 2)."""
    from maas_tui.ssh.bootstrap import parse_target

    try:
        where = parse_target(target, port)
    except ValueError as exc:
        print_error(f"{target}: {exc}")
        raise typer.Exit(2) from None
    if not 1 <= where.port <= 65535:
        print_error(f"{target}: the port must be from 1 to 65535, not {where.port}")
        raise typer.Exit(2)
    where.identity = str(identity.expanduser()) if identity else None
    if no_host_key_check:
        where.known_hosts = None
    return where


def worker_uninstall(target: str = typer.Argument(..., help="user@host or user@host:port"),
                     identity: Optional[Path] = typer.Option(None, help="SSH private key"),
                     port: int = port_option(22, "SSH port", flag="--port"),
                     remote_dir: str = typer.Option("~/.maas", help="where the agent lives on the remote host"),
                     remove: Optional[str] = typer.Option(None, "--remove", help="then remove this worker from the cluster"),
                     no_host_key_check: bool = typer.Option(False, "--no-host-key-check", help="accept any host key")) -> None:
    """Stop and remove an agent that `maas worker add` installed (and with --remove NAME, the worker)."""
    from maas_tui.cli.main import call, fail
    from maas_tui.ssh.bootstrap import BootstrapError, uninstall

    where = _target(target, port, identity, no_host_key_check)
    try:
        asyncio.run(uninstall(where, remote_dir, say=lambda m: console.print(m, highlight=False)))
    except (BootstrapError, OSError) as exc:
        fail(str(exc))
    if remove:
        call(lambda c: c.delete_worker(remove))
        console.print(f"worker {remove} removed", highlight=False)


__all__ = ["register", "user_app", "ssh_app", "worker_add", "worker_uninstall", "asyncio"]
