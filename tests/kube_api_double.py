"""TEST DOUBLE of a Kubernetes API server: no real kube-apiserver can be installed here (none
on PyPI, Debian or npm; envtest/k3s binaries are downloads). It serves, over real HTTP or
HTTPS on 127.0.0.1, the REST paths of the three resources MaaS writes for Higress
(ingresses, wasmplugins, mcpbridges) in any namespace, and behaves as Kubernetes does where
MaaS depends on it:

- optimistic concurrency: every write gets a new metadata.resourceVersion; a PUT whose
  resourceVersion is not the current one gets 409 Conflict (reason Conflict, the real
  message); a PUT without one is an unconditional update (as Ingress and custom resources
  allow); a POST of an existing name gets 409 AlreadyExists; a no-op PUT keeps the version;
- 404 NotFound Status bodies; name/namespace in the body must match the URL (400);
- authentication by bearer token or by a client certificate signed by the cluster CA (401);
- list with `labelSelector` (equality terms only);
- validation: custom resources against Higress's CRD schemas from tests/fixtures/higress,
  Ingresses with kubernetes-validate; unknown fields are rejected with 400 BadRequest as
  with `fieldValidation=Strict` (what the MaaS applier sends), schema violations get 422 Invalid.

Everything else of Kubernetes (watch, patch, admission, finalizers, other kinds) is absent.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import itertools
import ssl
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import jsonschema
import kubernetes_validate
import yaml
from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures" / "higress"  # Higress CRDs, Apache-2.0: see NOTICE.md there
KUBERNETES_VERSION = "1.30"


def strict_schema(schema: Any) -> Any:
    """A CRD schema, but rejecting unknown fields (as fieldValidation=Strict does) and reading
    `nullable` the JSON-schema way."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()
           if k not in ("nullable", "x-kubernetes-preserve-unknown-fields")}
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schemas() -> dict[str, dict[str, Any]]:
    """kind -> {"apiVersion", "schema" (strict), "group", "plural"} for each CRD version."""
    found = {}
    for crd in yaml.safe_load_all((FIXTURES / "customresourcedefinitions.gen.yaml").read_text()):
        if crd:
            for version in crd["spec"]["versions"]:
                found[crd["spec"]["names"]["kind"]] = {
                    "apiVersion": f"{crd['spec']['group']}/{version['name']}", "group": crd["spec"]["group"],
                    "plural": crd["spec"]["names"]["plural"],
                    "schema": strict_schema(version["schema"]["openAPIV3Schema"])}
    return found


CRDS = crd_schemas()
# plural -> (group, version, kind)
RESOURCES = {
    "ingresses": ("networking.k8s.io", "v1", "Ingress"),
    "wasmplugins": ("extensions.higress.io", "v1alpha1", "WasmPlugin"),
    "mcpbridges": ("networking.higress.io", "v1", "McpBridge"),
}


class Invalid(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def validate(obj: dict[str, Any]) -> None:
    """Raise Invalid as the API server would: 400 for unknown fields (Strict), 422 otherwise."""
    kind = obj.get("kind")
    if kind == "Ingress":
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # a jsonschema.ValidationError
            where = ".".join(str(p) for p in exc.absolute_path)
            if exc.validator == "additionalProperties":
                raise Invalid(400, "BadRequest", f"strict decoding error: {exc.message} at {where}") from None
            raise Invalid(422, "Invalid", f"Ingress.networking.k8s.io is invalid: {where}: {exc.message}") from None
        return
    crd = CRDS[kind]
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        raise Invalid(400, "BadRequest", f'strict decoding error: unknown field "{sorted(unknown)[0]}"')
    try:
        jsonschema.validate({k: v for k, v in obj.items() if k == "spec"}, crd["schema"])
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        if exc.validator == "additionalProperties":
            raise Invalid(400, "BadRequest", f"strict decoding error: {exc.message} at {where}") from None
        raise Invalid(422, "Invalid", f"{kind}.{crd['group']} is invalid: {where}: {exc.message}") from None


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.lstrip("=").strip():
            return False
    return True


Hook = Callable[[str, str], Awaitable[None]]


class KubeApiDouble:
    """The test double. `store[(plural, namespace, name)]` holds the objects; `log` records
    (method, path, status) for every request; `before_reply(method, path)`, if set, runs
    after a request was served and before its reply leaves (to stage a concurrent writer)."""

    def __init__(self, token: str | None = "test-token", tls: ssl.SSLContext | None = None):
        self.token = token
        self.tls = tls
        self.store: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.log: list[tuple[str, str, int]] = []
        self.before_reply: Hook | None = None
        self._versions = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        base = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
        app.router.add_route("GET", base, self._list)
        app.router.add_route("POST", base, self._create)
        app.router.add_route("GET", base + "/{name}", self._get)
        app.router.add_route("PUT", base + "/{name}", self._replace)
        app.router.add_route("DELETE", base + "/{name}", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.tls)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def objects(self, plural: str, namespace: str = "higress-system") -> dict[str, dict[str, Any]]:
        return {name: obj for (p, ns, name), obj in self.store.items() if p == plural and ns == namespace}

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = self._authenticate(request) or await self._checked(request, handler)
        self.log.append((request.method, request.path, response.status))
        if self.before_reply is not None:
            await self.before_reply(request.method, request.path)
        return response

    def _authenticate(self, request: web.Request) -> web.Response | None:
        if self.token and request.headers.get("Authorization") == f"Bearer {self.token}":
            return None
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is not None and ssl_object.getpeercert():  # verified against the cluster CA
            return None
        return _status(401, "Unauthorized", "Unauthorized")

    async def _checked(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _status(404, "NotFound", "the server could not find the requested resource")

    def _resource(self, request: web.Request) -> tuple[str, str, str, str]:
        info = request.match_info
        plural = info["plural"]
        if plural not in RESOURCES or RESOURCES[plural][:2] != (info["group"], info["version"]):
            raise web.HTTPNotFound()
        return plural, RESOURCES[plural][0], RESOURCES[plural][2], info["namespace"]

    def _not_found(self, plural: str, group: str, name: str) -> web.Response:
        return _status(404, "NotFound", f'{plural}.{group} "{name}" not found',
                       {"name": name, "group": group, "kind": plural})

    async def _body(self, request: web.Request, kind: str, group: str, namespace: str) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise Invalid(400, "BadRequest", f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise Invalid(400, "BadRequest", "the body must be an object with metadata")
        version = RESOURCES[request.match_info["plural"]][1]
        api_version = f"{group}/{version}"
        if body.get("kind") != kind or body.get("apiVersion") != api_version:
            raise Invalid(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) and kind "
                                             f"({body.get('kind')}) do not match {api_version} {kind}")
        meta = body["metadata"]
        if meta.get("namespace", namespace) != namespace:
            raise Invalid(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                             "sent on the request")
        meta["namespace"] = namespace
        validate(body)
        return body

    async def _list(self, request: web.Request) -> web.Response:
        plural, group, kind, namespace = self._resource(request)
        selector = request.query.get("labelSelector", "")
        items = [copy.deepcopy(obj) for (p, ns, _), obj in sorted(self.store.items())
                 if p == plural and ns == namespace and _matches(obj["metadata"].get("labels") or {}, selector)]
        version = RESOURCES[plural][1]
        return web.json_response({"apiVersion": f"{group}/{version}", "kind": f"{kind}List",
                                  "metadata": {"resourceVersion": str(next(self._versions))}, "items": items})

    async def _get(self, request: web.Request) -> web.Response:
        plural, group, _kind, namespace = self._resource(request)
        name = request.match_info["name"]
        obj = self.store.get((plural, namespace, name))
        if obj is None:
            return self._not_found(plural, group, name)
        return web.json_response(copy.deepcopy(obj))

    async def _create(self, request: web.Request) -> web.Response:
        plural, group, kind, namespace = self._resource(request)
        try:
            body = await self._body(request, kind, group, namespace)
        except Invalid as exc:
            return _status(exc.status, exc.reason, exc.message)
        meta = body["metadata"]
        name = meta.get("name")
        if not name:
            return _status(422, "Invalid", f"{kind}.{group} is invalid: metadata.name: Required value: name or "
                                           "generateName is required")
        if meta.get("resourceVersion"):
            return _status(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if (plural, namespace, name) in self.store:
            return _status(409, "AlreadyExists", f'{plural}.{group} "{name}" already exists',
                           {"name": name, "group": group, "kind": plural})
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                    creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.store[(plural, namespace, name)] = body
        return web.json_response(copy.deepcopy(body), status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        plural, group, kind, namespace = self._resource(request)
        name = request.match_info["name"]
        try:
            body = await self._body(request, kind, group, namespace)
        except Invalid as exc:
            return _status(exc.status, exc.reason, exc.message)
        meta = body["metadata"]
        if meta.get("name") != name:
            return _status(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the "
                                              f"name on the URL ({name})")
        current = self.store.get((plural, namespace, name))
        if current is None:  # Ingress and custom resources do not create on update
            return self._not_found(plural, group, name)
        old = current["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on {plural}.{group} "{name}": the object '
                                            "has been modified; please apply your changes to the latest version and "
                                            "try again", {"name": name, "group": group, "kind": plural})
        # Fields the server owns survive whatever the client sent.
        for key in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            meta[key] = old[key]
        if body == current:  # a no-op update writes nothing and keeps the version
            return web.json_response(copy.deepcopy(current))
        if body.get("spec") != current.get("spec"):
            meta["generation"] = old["generation"] + 1
        meta["resourceVersion"] = str(next(self._versions))
        self.store[(plural, namespace, name)] = body
        return web.json_response(copy.deepcopy(body))

    async def _delete(self, request: web.Request) -> web.Response:
        plural, group, _kind, namespace = self._resource(request)
        name = request.match_info["name"]
        obj = self.store.pop((plural, namespace, name), None)
        if obj is None:
            return self._not_found(plural, group, name)
        return web.json_response(obj)


# --- a cluster CA, a server certificate for 127.0.0.1 and a client certificate -----------

def make_pki(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(key: Any, cert: x509.Certificate, stem: str) -> None:
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def issue(subject: str, issuer_key: Any, issuer: x509.Name, key: Any, ca: bool, usage: Any = None,
              ip: str | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        else:
            builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ip:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-cluster-ca", ca_key, name("test-cluster-ca"), ca_key, ca=True)
    write(ca_key, ca, "ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    write(server_key, issue("kube-apiserver", ca_key, ca.subject, server_key, False,
                            ExtendedKeyUsageOID.SERVER_AUTH, "127.0.0.1"), "server")
    client_key = ec.generate_private_key(ec.SECP256R1())
    write(client_key, issue("maas", ca_key, ca.subject, client_key, False, ExtendedKeyUsageOID.CLIENT_AUTH), "client")
    return {stem: folder / stem for stem in ("ca", "server", "client")}


def server_tls(pki: dict[str, Path]) -> ssl.SSLContext:
    """HTTPS with the cluster's server certificate; client certificates optional, verified by the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(f"{pki['server']}.crt", f"{pki['server']}.key")
    context.load_verify_locations(f"{pki['ca']}.crt")
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "maas", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "maas"}}],
    }))
    return path
