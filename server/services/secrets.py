"""Team secrets, encrypted at rest: values a model's env names as {secret: NAME}.

Values are encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with the servers' secrets key, kept outside
the database: `<data-dir>/secrets.key` (0600, made by the first server) or MAAS_SECRETS_KEY (the
same key for every server on one database). The database holds a digest of the key, so a server
with another key refuses to read or write secrets instead of producing garbage. Plain values live
only in the request that sets them and in the answer to the agent that starts the instance.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from server.db import tables
from server.db.settings import put_setting

KEY_CHECK = "secrets_key_digest"


class SecretsUnavailable(Exception):
    """This server cannot encrypt or decrypt: no key, or not the cluster's key."""


def _digest(key: bytes) -> str:
    return hashlib.sha256(b"maas-secrets:" + key).hexdigest()


def _write_key(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key + b"\n")


class SecretBox:
    def __init__(self, key: bytes | None, problem: str = ""):
        self._fernet = Fernet(key) if key else None
        self.problem = problem

    @classmethod
    async def open(cls, session, data_dir: Path, environ: dict[str, str] | None = None) -> "SecretBox":
        """The key from MAAS_SECRETS_KEY or the data folder; the first server of a cluster makes one."""
        environ = os.environ if environ is None else environ
        path = data_dir / "secrets.key"
        given = environ.get("MAAS_SECRETS_KEY", "").strip().encode() or None
        key = given or (path.read_bytes().strip() if path.exists() else None)
        check = await session.get(tables.Setting, KEY_CHECK)
        if key is None and check is None:
            key = Fernet.generate_key()
            _write_key(path, key)
        if key is None:
            return cls(None, f"this server has no secrets key: give it the cluster's (MAAS_SECRETS_KEY, or "
                             f"{path.name} from the first server's data folder)")
        try:
            Fernet(key)
        except ValueError:
            return cls(None, "the secrets key is not a valid key (32 url-safe base64-encoded bytes)")
        if check is None:
            await put_setting(session, KEY_CHECK, _digest(key))
            await session.commit()
        elif check.value != _digest(key):
            return cls(None, "this server's secrets key is not the one the cluster's secrets were written with")
        return cls(key)

    def _ready(self) -> Fernet:
        if self._fernet is None:
            raise SecretsUnavailable(self.problem)
        return self._fernet

    def seal(self, value: str) -> str:
        return self._ready().encrypt(value.encode()).decode()

    def unseal(self, ciphertext: str) -> str:
        try:
            return self._ready().decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretsUnavailable("a secret could not be decrypted with this server's key") from None


def referenced(env: dict[str, object]) -> dict[str, str]:
    """Env name -> secret name, for the values that are {secret: NAME} (wire objects or plain dicts)."""
    found = {}
    for name, value in env.items():
        secret = value.get("secret") if isinstance(value, dict) else getattr(value, "secret", None)
        if isinstance(secret, str):
            found[name] = secret
    return found


async def missing(session, team: str | None, names: set[str]) -> set[str]:
    """The names among `names` that are not secrets of `team`."""
    if not names:
        return set()
    rows = await session.execute(select(tables.Secret.name).where(tables.Secret.team == team,
                                                                  tables.Secret.name.in_(names)))
    return names - {name for (name,) in rows.all()}


async def values(session, box: SecretBox, team: str | None, refs: dict[str, str]) -> dict[str, str]:
    """Env name -> plain value for the references `refs` of a model of `team`."""
    if not refs:
        return {}
    rows = {row.name: row for row in (await session.execute(select(tables.Secret).where(
        tables.Secret.team == team, tables.Secret.name.in_(set(refs.values()))))).scalars()}
    gone = sorted({secret for secret in refs.values() if secret not in rows})
    if gone:
        raise KeyError(", ".join(gone))
    return {env: box.unseal(rows[secret].ciphertext) for env, secret in refs.items()}
