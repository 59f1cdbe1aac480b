"""What the CLI takes from the user, checked before anything is sent: files given with -f (bounded,
UTF-8 text, never binary), YAML without duplicate keys, server URLs, TCP ports.

Problems are `InputProblem`s: a command prints the message (no traceback) and exits 1 for a file whose
content is wrong, 2 for a usage error (an unreadable path, a bad URL or port).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer
import yaml

# A manifest, a backend definition or a public key is a few KiB; this bounds what a mistaken path
# (a model file, /dev/zero) costs before it is refused.
MAX_INPUT_BYTES = 4 * 1024 * 1024


class InputProblem(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def read_input_file(file: str | Path, limit: int = MAX_INPUT_BYTES) -> tuple[str, Path]:
    """The text of FILE (or stdin for `-`) and the folder relative paths in it are relative to.

    At most `limit` bytes are read: a longer input, one with NUL bytes (binary) or one that is not
    UTF-8 is refused with a message."""
    name = str(file)
    if name == "-":
        raw, base = sys.stdin.buffer.read(limit + 1), Path.cwd()
    else:
        path = Path(name).expanduser()
        try:
            with open(path, "rb") as stream:
                raw = stream.read(limit + 1)
        except OSError as exc:
            raise InputProblem(f"cannot read {name}: {exc.strerror or exc}", code=2) from None
        base = path.absolute().parent
    if len(raw) > limit:
        raise InputProblem(f"{name} is larger than {limit // (1024 * 1024)} MiB: not a manifest (a model file?)")
    if b"\0" in raw:
        raise InputProblem(f"{name} is a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputProblem(f"{name} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    return text.removeprefix("\ufeff"), base


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"the key {key!r} is given twice", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


# Values a file may hold once its aliases are expanded: a few aliases can stand for billions of values
# ("billion laughs"), which validating or sending them would walk through.
MAX_VALUES = 1_000_000


def load_yaml_documents(text: str, name: str) -> list[Any]:
    """Every non-empty YAML document of TEXT (JSON is YAML too); duplicate keys are refused, and so is a
    file whose aliases expand to more than MAX_VALUES values."""
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]
    except yaml.YAMLError as exc:
        raise InputProblem(f"{name} is not valid YAML: {exc}") from None
    if _values_over(documents, MAX_VALUES):
        raise InputProblem(f"{name} expands to more than {MAX_VALUES:,} values (YAML aliases): not a manifest")
    return documents


def _values_over(root: Any, limit: int) -> bool:
    """Whether walking ROOT (aliases expanded, as a consumer would) meets more than LIMIT values."""
    count, stack = 0, [root]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return False


def server_url(url: str) -> str:
    """An http(s) URL with a host (and a valid port), without the trailing slash; else a usage error."""
    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError as exc:
        raise InputProblem(f"server URL {url!r}: {exc}", code=2) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputProblem(f"server URL {url!r}: write http://HOST:PORT or https://HOST", code=2)
    if parts.query or parts.fragment:
        raise InputProblem(f"server URL {url!r}: no query or fragment, just scheme, host, port (and a path)", code=2)
    return url


def url_callback(value: str | None) -> str | None:
    """A Typer callback for URL options: a bad URL is a usage error (exit 2) naming the option."""
    if value is None:
        return None
    try:
        return server_url(value)
    except InputProblem as exc:
        raise typer.BadParameter(exc.message) from None


def port_option(default: int | None, help: str, allow_zero: bool = False, flag: str | None = None) -> Any:
    """A TCP port option: 1-65535 (0 too where it means "any free port"); Click refuses others (exit 2)."""
    names = (flag,) if flag else ()
    return typer.Option(default, *names, min=0 if allow_zero else 1, max=65535, help=help)
