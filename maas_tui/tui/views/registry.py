"""The one registry of TUI views: name, `:` aliases, a one-line summary, columns and key hints.

A view module registers its screen class with `@view(...)`. The `:` command line, its completion,
the command palette, the app's installed screens and the help page are all read from here; the
help lists each view's keys from its Textual bindings (description, or the longer tooltip), so a
key is documented where it is bound and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from textual.binding import Binding


@dataclass(frozen=True)
class ViewSpec:
    name: str
    screen: type
    title: str  # in the help page
    aliases: tuple[str, ...] = ()
    navigable: bool = True  # a `:` target installed once; False for screens pushed on top (describe, logs)
    notes: tuple[str, ...] = field(default=())  # legends for the help page (what a symbol means), not keys

    @property
    def columns(self) -> list[tuple[str, int | None]]:
        """The table's columns, wide ones last (empty for views that are not tables)."""
        return list(getattr(self.screen, "COLUMNS", [])) + list(getattr(self.screen, "WIDE_COLUMNS", []))

    @property
    def key_hints(self) -> list[tuple[str, str]]:
        """(key, what it does) for every binding the view itself declares."""
        return binding_hints(self.screen.__dict__.get("BINDINGS", []))


REGISTRY: dict[str, ViewSpec] = {}
# Words the `:` line understands beyond the views.
BUILTIN_COMMANDS: dict[str, list[str]] = {"help": ["help", "h", "?"], "quit": ["quit", "q", "q!", "exit"]}


def view(name: str, title: str, aliases: Iterable[str] = (), navigable: bool = True,
         notes: Iterable[str] = ()) -> Callable[[type], type]:
    def register(screen: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"a view named {name!r} is registered twice")
        REGISTRY[name] = ViewSpec(name, screen, title, tuple(aliases), navigable, tuple(notes))
        if navigable:
            screen.VIEW = name  # what the header shows
        return screen
    return register


def navigable() -> dict[str, ViewSpec]:
    return {name: spec for name, spec in REGISTRY.items() if spec.navigable}


def commands() -> dict[str, list[str]]:
    """Every `:` target with the words that reach it (its name first)."""
    found = {name: [name, *spec.aliases] for name, spec in navigable().items()}
    return found | BUILTIN_COMMANDS


def resolve_command(text: str) -> str | None:
    """What a `:` line names: an exact alias, else the one target some alias starts with."""
    word = text.strip().lstrip(":").strip().lower()
    if not word:
        return None
    aliases = {alias: target for target, names in commands().items() for alias in names}
    if word in aliases:
        return aliases[word]
    prefixed = {target for alias, target in aliases.items() if alias.startswith(word)}
    return prefixed.pop() if len(prefixed) == 1 else None


_KEY_NAMES = {"colon": ":", "slash": "/", "question_mark": "?", "plus": "+", "minus": "-", "escape": "esc",
              "enter": "enter"}


def key_label(binding: Binding) -> str:
    if binding.key_display:
        return binding.key_display
    return "/".join(_KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(",")[:2])


def binding_hints(bindings: Iterable[Any]) -> list[tuple[str, str]]:
    hints = []
    for binding in bindings:
        # Hidden bindings without a tooltip (cursor movement) go without saying.
        if isinstance(binding, Binding) and (binding.tooltip or (binding.description and binding.show)):
            hints.append((key_label(binding), binding.tooltip or binding.description.lower()))
    return hints
