"""Forms: deploy, scale, edit a model's spec, create an API key.

Forms validate every field locally first: a bad field is flagged under the field and nothing is
sent. Errors the server returns are shown in the form, which stays open.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable

from pydantic import ValidationError
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from maas_tui.client import ApiClientError
from maas_tui.render.claims import claim_cell
from server import schemas
from server.schemas.backend_traits import BACKEND_TRAITS

NAME_RE = re.compile(schemas.MODEL_NAME_PATTERN)
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def source_problem(source: str, backend: str) -> str | None:
    """What the server would refuse in a source's form (schemas.parse_model_source and the backend's
    layout in the traits table), or None. Whether the file lies under a model root only the server knows."""
    try:
        parsed = schemas.parse_model_source(source)
    except schemas.SourceError as exc:
        return str(exc).split(": ", 1)[-1]
    traits = BACKEND_TRAITS.get(backend)
    if traits is None:
        return None  # a custom backend may take a name of its own
    gguf = traits.layout == "gguf"
    if parsed.kind == "local" and not source.startswith("/"):
        return f"{backend} needs an absolute path on the worker" + (" to a .gguf file" if gguf else "")
    if gguf and parsed.kind == "local" and not source.endswith(".gguf"):
        return f"{backend} serves one .gguf file"
    if gguf and parsed.kind != "local" and not (parsed.filename or "").endswith(".gguf"):
        return f"{backend} serves one GGUF file: name it, e.g. hf://ORG/NAME/FILE.gguf"
    return None


def field_errors(exc: Exception, fields: dict[str, str]) -> dict[str, str]:
    """Errors of the wire models (pydantic, or the server's 4xx details) under the form's fields:
    `fields` maps a wire field (its first part: `args[2]` -> `args`, `env.X` -> `env`) to a form field."""
    found: dict[str, str] = {}
    if isinstance(exc, ValidationError):
        items = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    else:
        items = [(d.get("field", ""), d.get("message", "")) for d in getattr(exc, "details", None) or []
                 if isinstance(d, dict)]
    for wire, message in items:
        key = re.split(r"[.\[]", wire or "", maxsplit=1)[0]
        found.setdefault(fields.get(key, fields.get("", "name")), message)
    return found


def whole_number(text: str, low: int, high: int, what: str) -> tuple[int | None, str | None]:
    text = text.strip()
    if not text or not (text.isascii() and text.isdigit()):
        return None, f"{what} must be a whole number from {low} to {high}"
    value = int(text)
    if not low <= value <= high:
        return None, f"{what} must be from {low} to {high}"
    return value, None


class FormScreen(ModalScreen[Any]):
    """Shared by the forms: field rows with an error line each, a status line, submit/cancel."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Submit", priority=True)]

    def __init__(self) -> None:
        super().__init__(classes="dialog-screen")
        self.busy = False
        self.status_text = ""

    def field(self, label: str, widget: Any, name: str) -> ComposeResult:
        with Vertical(classes="field-group"):
            with Horizontal(classes="field"):
                yield Label(label, classes="field-label")
                yield widget
            yield Static("", id=f"{name}-error", classes="field-error")

    def set_error(self, name: str, message: str | None) -> None:
        error = self.query_one(f"#{name}-error", Static)
        error.update(Text(f"✖ {message}" if message else ""))  # server text: never markup
        error.set_class(bool(message), "-shown")
        widget = self.query_one(f"#{name}")
        widget.set_class(bool(message), "-invalid")

    def set_status(self, message: str, error: bool = True) -> None:
        self.status_text = message
        status = self.query_one("#status", Static)
        status.update(Text(message))
        status.set_class(error, "-error")

    def action_cancel(self) -> None:
        if not self.busy:
            self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Button.Pressed, "#submit")
    def submit_pressed(self) -> None:
        self.action_submit()

    @on(Input.Submitted)
    def input_submitted(self) -> None:
        self.action_submit()

    def action_submit(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def send(self, call: Callable[[], Any], on_error: Callable[[ApiClientError], bool] | None = None) -> None:
        """Run the API call in a worker; dismiss with its result, or show the error and stay open."""
        self.busy = True
        self.set_status("sending…", error=False)

        async def run() -> None:
            try:
                result = await call()
            except ApiClientError as exc:
                self.busy = False
                if on_error is None or not on_error(exc):
                    self.set_status(f"✖ {exc.message}")
                else:
                    self.set_status("✖ the server refused it: see the field above")
                return
            self.busy = False
            self.dismiss(result)

        self.run_worker(run, group="form", exclusive=True)


HAS_PLACEMENT = "placement_strategy" in schemas.ModelSpec.model_fields
HAS_GPU_TYPE = "gpu_type" in schemas.ModelSpec.model_fields


class DeployForm(FormScreen):
    """Deploy a model: name, source, backend, replicas, context length, CPU only, placement, GPU type,
    extra args; ctrl+r previews where the replicas would go (a dry run: nothing is written)."""

    BINDINGS = [Binding("ctrl+r", "preview", "Preview", priority=True)]

    # The wire fields the server and ModelCreate name -> the form's fields.
    FIELDS = {"name": "name", "source": "source", "backend": "backend", "replicas": "replicas",
              "context_length": "context", "cpu_only": "backend", "args": "args", "gpu_type": "gpu_type",
              "placement_strategy": "backend", "env": "args",
              "": "backend"}  # the spec's cross-field rules are about what fits the backend

    def compose(self) -> ComposeResult:
        backends = [(b, b) for b in schemas.KNOWN_BACKENDS]  # custom ones join when the server answers
        with Vertical(classes="dialog form"):
            yield Static("Deploy a model", classes="dialog-title")
            with VerticalScroll(classes="form-body"):
                yield from self.field("Name", Input(placeholder="e.g. llama-3-8b", id="name", compact=True), "name")
                yield from self.field("Source", Input(placeholder="/abs/path/model.gguf (on the worker)", id="source",
                                                      compact=True), "source")
                yield from self.field("Backend", Select(backends, value=backends[0][1], allow_blank=False, id="backend",
                                                        compact=True), "backend")
                yield from self.field("Replicas", Input("1", id="replicas", compact=True), "replicas")
                yield from self.field("Context", Input("2048", id="context", compact=True), "context")
                yield from self.field("CPU only", Checkbox("serve from host RAM, claim no GPU", id="cpu_only"),
                                      "cpu_only")
                if HAS_PLACEMENT:
                    yield from self.field("Placement", Select([("spread: replicas on different workers", "spread"),
                                                               ("binpack: fill GPUs tightly", "binpack")],
                                                              value="spread", allow_blank=False, id="placement",
                                                              compact=True), "placement")
                if HAS_GPU_TYPE:
                    yield from self.field("GPU type", Input(placeholder="optional, e.g. H100 (GPU names containing it)",
                                                            id="gpu_type", compact=True), "gpu_type")
                yield from self.field("Args", Input(placeholder="extra backend arguments, e.g. --threads 2", id="args",
                                                    compact=True), "args")
            yield Static("", id="status", classes="status")
            with Horizontal(classes="buttons"):
                if hasattr(self.app.client, "evaluate_model"):
                    yield Button("Preview (ctrl+r)", id="preview", compact=True)
                yield Button("Deploy (ctrl+s)", id="submit", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()
        if hasattr(self.app.client, "list_backends"):
            self.run_worker(self._load_backends, group="backends")

    async def _load_backends(self) -> None:
        """Every backend the server knows, custom ones (custom:NAME) included."""
        try:
            listed = await self.app.client.list_backends()
        except ApiClientError:
            return  # the built-in ones stay offered; the server checks the choice anyway
        names = [b.name if b.builtin else f"{schemas.CUSTOM_BACKEND_PREFIX}{b.name}" for b in listed]
        select = self.query_one("#backend", Select)
        current = select.value
        select.set_options([(n, n) for n in names])
        if current in names:
            select.value = current

    def validate_fields(self) -> tuple[dict[str, Any] | None, dict[str, str]]:
        errors: dict[str, str] = {}
        name = self.query_one("#name", Input).value.strip()
        if not name:
            errors["name"] = "a name is required"
        elif not NAME_RE.match(name):
            errors["name"] = "letters, digits and . _ : - only; start with a letter or digit; at most 100"
        source = self.query_one("#source", Input).value.strip()
        backend = str(self.query_one("#backend", Select).value)
        if not source:
            errors["source"] = "a source is required"
        elif "\x00" in source or len(source) > 2000:
            errors["source"] = "not a usable path"
        elif problem := source_problem(source, backend):
            errors["source"] = problem
        replicas, message = whole_number(self.query_one("#replicas", Input).value, 0, 1000, "replicas")
        if message:
            errors["replicas"] = message
        context, message = whole_number(self.query_one("#context", Input).value, 64, 1_048_576, "context length")
        if message:
            errors["context"] = message
        args_text = self.query_one("#args", Input).value
        try:
            args = shlex.split(args_text)
        except ValueError as exc:
            errors["args"] = f"cannot split the arguments: {exc}"
            args = []
        gpu_type = self.query_one("#gpu_type", Input).value.strip() if HAS_GPU_TYPE else ""
        if len(gpu_type) > 100:
            errors["gpu_type"] = "at most 100 characters"
        cpu_only = self.query_one("#cpu_only", Checkbox).value
        body: dict[str, Any] = {"name": name, "source": source, "backend": backend, "replicas": replicas,
                                "context_length": context, "cpu_only": cpu_only, "args": args}
        if HAS_PLACEMENT:
            body["placement_strategy"] = str(self.query_one("#placement", Select).value)
        if gpu_type:
            body["gpu_type"] = gpu_type
        if not errors:  # the rest of the rules are the server's own: the same ModelCreate
            try:
                schemas.ModelCreate.model_validate(body)
            except ValidationError as exc:
                errors = field_errors(exc, self.FIELDS)
        for field in ("name", "source", "backend", "replicas", "context", "args") + (("gpu_type",) if HAS_GPU_TYPE
                                                                                    else ()):
            self.set_error(field, errors.get(field))
        if errors:
            return None, errors
        return body, errors

    @on(Button.Pressed, "#preview")
    def preview_pressed(self) -> None:
        self.action_preview()

    def action_preview(self) -> None:
        """A dry run: where each replica would go now, or why it would not. Nothing is written."""
        evaluate = getattr(self.app.client, "evaluate_model", None)
        if self.busy or evaluate is None:
            return
        body, errors = self.validate_fields()
        if body is None:
            self.set_status(f"✖ fix {len(errors)} field{'s' if len(errors) > 1 else ''} first; nothing was sent")
            return
        self.busy = True
        self.set_status("previewing…", error=False)

        async def run() -> None:
            try:
                result = await evaluate(body)
            except ApiClientError as exc:
                self.set_status(f"✖ {exc.message}")
                return
            finally:
                self.busy = False
            self.set_status(preview_text(result), error=result.schedulable < len(result.replicas))

        self.run_worker(run, group="form", exclusive=True)

    def action_submit(self) -> None:
        if self.busy:
            return
        body, errors = self.validate_fields()
        if body is None:
            self.set_status(f"✖ fix {len(errors)} field{'s' if len(errors) > 1 else ''}; nothing was sent")
            first = next(iter(errors))
            self.query_one(f"#{first}").focus()
            return

        def server_error(exc: ApiClientError) -> bool:
            if found := field_errors(exc, self.FIELDS):  # a 400 spec_refused or 422 names its fields
                for field, message in found.items():
                    self.set_error(field, message)
                return True
            text = exc.message.lower()
            for field, words in (("name", ("model '", "name")), ("source", ("source", "model file", "path")),
                                 ("backend", ("backend",)), ("context", ("context",)), ("replicas", ("replicas",))):
                if any(w in text for w in words):
                    self.set_error(field, exc.message)
                    return True
            return False

        self.send(lambda: self.app.client.create_model(body), server_error)


def preview_text(result: Any) -> str:
    """A dry-run result as a few lines: the verdict, then each replica's worker and GPUs, or why not."""
    lines = [f"Preview: {result.message or f'{result.schedulable} of {len(result.replicas)} replicas fit now'}"]
    estimate = getattr(result, "estimate", None)
    if estimate is not None and getattr(estimate, "total_bytes", 0):
        lines[0] += f" · needs {estimate.total_bytes / 1000**3:.2f} GB per replica"
    for placement in result.replicas[:4]:
        if placement.scheduled and placement.claim is not None:
            lines.append(f"  replica {placement.replica}: {placement.worker} {claim_cell(placement.claim)}")
        else:
            why = "; ".join(f"{r.worker or 'all'}: {r.message}" for r in placement.reasons[:2]) or "no room"
            lines.append(f"  replica {placement.replica}: not now: {why}")
    if len(result.replicas) > 4:
        lines.append(f"  … and {len(result.replicas) - 4} more")
    return "\n".join(lines)


class ScaleForm(FormScreen):
    def __init__(self, model: str, replicas: int) -> None:
        super().__init__()
        self.model = model
        self.replicas = replicas

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static(f"Scale {self.model}", classes="dialog-title")
            yield from self.field("Replicas", Input(str(self.replicas), id="replicas", compact=True), "replicas")
            yield Static("", id="status", classes="status")
            with Horizontal(classes="buttons"):
                yield Button("Scale (enter)", id="submit", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        replicas = self.query_one("#replicas", Input)
        replicas.focus()
        replicas.select_all()

    def action_submit(self) -> None:
        if self.busy:
            return
        value, message = whole_number(self.query_one("#replicas", Input).value, 0, 1000, "replicas")
        self.set_error("replicas", message)
        if value is None:
            self.set_status("✖ nothing was sent")
            return
        self.send(lambda: self.app.client.update_model(self.model, {"replicas": value}))


class EditForm(FormScreen):
    """Edit a model's spec: a change is a new generation, rolled out within max surge / max unavailable.
    Only the fields that changed are sent; with none changed, nothing is."""

    def __init__(self, model: schemas.ModelOut) -> None:
        super().__init__()
        self.model = model

    def compose(self) -> ComposeResult:
        spec = self.model.spec
        with Vertical(classes="dialog form edit"):
            yield Static(f"Edit {self.model.name} (generation {self.model.generation})", classes="dialog-title")
            with VerticalScroll(classes="form-body"):
                yield from self.field("Source", Input(spec.source, id="source", compact=True), "source")
                yield from self.field("Context", Input(str(spec.context_length), id="context", compact=True), "context")
                yield from self.field("Args", Input(shlex.join(spec.args), placeholder="extra backend arguments",
                                                    id="args", compact=True), "args")
                yield from self.field("Max surge", Input(str(self.model.max_surge), id="max_surge", compact=True),
                                      "max_surge")
                yield from self.field("Max unav.", Input(str(self.model.max_unavailable), id="max_unavailable",
                                                           compact=True), "max_unavailable")
            yield Static("A spec change starts a rollout: new instances replace old ones, within max surge (extra) "
                         "and max unavailable (missing).", classes="hint")
            yield Static("", id="status", classes="status")
            with Horizontal(classes="buttons"):
                yield Button("Roll out (ctrl+s)", id="submit", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#source", Input).focus()

    def validate_fields(self) -> tuple[dict[str, Any] | None, dict[str, str]]:
        errors: dict[str, str] = {}
        spec = self.model.spec
        source = self.query_one("#source", Input).value.strip()
        if not source:
            errors["source"] = "a source is required"
        elif "\x00" in source or len(source) > 2000:
            errors["source"] = "not a usable path"
        elif problem := source_problem(source, spec.backend):
            errors["source"] = problem
        context, message = whole_number(self.query_one("#context", Input).value, 64, 1_048_576, "context length")
        if message:
            errors["context"] = message
        try:
            args = shlex.split(self.query_one("#args", Input).value)
        except ValueError as exc:
            errors["args"] = f"cannot split the arguments: {exc}"
            args = []
        surge, message = whole_number(self.query_one("#max_surge", Input).value, 0, 1000, "max surge")
        if message:
            errors["max_surge"] = message
        unavailable, message = whole_number(self.query_one("#max_unavailable", Input).value, 0, 1000,
                                            "max unavailable")
        if message:
            errors["max_unavailable"] = message
        if surge == 0 and unavailable == 0:
            errors["max_unavailable"] = "max surge and max unavailable cannot both be 0: the rollout could not move"
        for field in ("source", "context", "args", "max_surge", "max_unavailable"):
            self.set_error(field, errors.get(field))
        if errors:
            return None, errors
        changes: dict[str, Any] = {}
        if source != spec.source:
            changes["source"] = source
        if context != spec.context_length:
            changes["context_length"] = context
        if args != list(spec.args):
            changes["args"] = args
        if surge != self.model.max_surge:
            changes["max_surge"] = surge
        if unavailable != self.model.max_unavailable:
            changes["max_unavailable"] = unavailable
        return changes, errors

    def action_submit(self) -> None:
        if self.busy:
            return
        changes, errors = self.validate_fields()
        if changes is None:
            self.set_status(f"✖ fix {len(errors)} field{'s' if len(errors) > 1 else ''}; nothing was sent")
            self.query_one(f"#{next(iter(errors))}").focus()
            return
        if not changes:
            self.set_status("nothing changed; nothing was sent")
            return

        def server_error(exc: ApiClientError) -> bool:
            text = exc.message.lower()
            for field, words in (("source", ("source", "model file", "path")), ("context", ("context",)),
                                 ("args", ("args", "argument")), ("max_surge", ("surge",)),
                                 ("max_unavailable", ("unavailable",))):
                if any(w in text for w in words):
                    self.set_error(field, exc.message)
                    return True
            return False

        self.send(lambda: self.app.client.update_model(self.model.name, changes), server_error)


class KeyCreateForm(FormScreen):
    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Static("Create an API key", classes="dialog-title")
            yield from self.field("Name", Input(placeholder="e.g. my-app", id="name", compact=True), "name")
            yield from self.field("Expires", Input(placeholder="days (empty: never)", id="expires", compact=True),
                                  "expires")
            yield Static("", id="status", classes="status")
            with Horizontal(classes="buttons"):
                yield Button("Create (enter)", id="submit", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def action_submit(self) -> None:
        if self.busy:
            return
        name = self.query_one("#name", Input).value.strip()
        name_error = None
        if not name:
            name_error = "a name is required"
        elif not KEY_NAME_RE.match(name):
            name_error = "letters, digits and . _ - only; start with a letter or digit"
        expires_text = self.query_one("#expires", Input).value.strip()
        days, expires_error = (None, None) if not expires_text else whole_number(expires_text, 1, 3650, "expiry days")
        self.set_error("name", name_error)
        self.set_error("expires", expires_error)
        if name_error or expires_error:
            self.set_status("✖ nothing was sent")
            return

        def server_error(exc: ApiClientError) -> bool:
            if "name" in exc.message.lower() or "exists" in exc.message.lower():
                self.set_error("name", exc.message)
                return True
            return False

        self.send(lambda: self.app.client.create_key(name, days), server_error)

