"""A test server: a tiny Hugging Face Hub (and ModelScope API) on 127.0.0.1, for the real client libraries.

`HubTestServer` implements just what `snapshot_download` and the scheduler's metadata reads use: the
model info API at a revision (`/api/models/ORG/NAME/revision/REV`, with `blobs=true` sizes), the tree
listing (`/api/models/ORG/NAME/tree/REV`) and file downloads (`/ORG/NAME/resolve/REV/FILE`, GET and HEAD
with the X-Repo-Commit, ETag and Content-Length headers the client checks, and byte ranges with
Content-Range), with the Hub's error headers (X-Error-Code: RepoNotFound / RevisionNotFound /
EntryNotFound). ModelScope's file listing (`/api/v1/models/ORG/NAME/repo/files`) and file reads
(`/api/v1/models/ORG/NAME/repo?FilePath=...`) serve the same repositories. One file can be held back
behind a gate so a test sees a download half done; partial reads (headers) are never held back.
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubTestServer:
    """A test server: a tiny Hugging Face Hub on 127.0.0.1 (see the module docstring)."""

    def __init__(self, repos: dict[str, dict[str, bytes]], private: set[str] = frozenset()):
        self.repos = repos
        self.private = set(private)
        self.gated_file: str | None = None  # this file's body waits for `gate`
        self.gate = asyncio.Event()
        self.downloads: list[str] = []  # GETs of file bodies, in order
        self.ranges: list[tuple[str, int, int]] = []  # partial reads (headers): (path, first byte, last byte)
        self.listings: list[str] = []  # repository info / file listings asked for, hub by hub
        self.refuse_ranges = False  # answer partial reads with 416, as a hub without range support might
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "HubTestServer":
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self.info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self.tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve)  # HEAD too
        # ModelScope's API over the same repositories (revision `master` or COMMIT).
        app.router.add_get("/api/v1/models/{org}/{name}/repo/files", self.ms_files)
        app.router.add_get("/api/v1/models/{org}/{name}/repo", self.ms_file)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        self.gate.set()
        if self.runner:
            await self.runner.cleanup()

    def _repo(self, request: web.Request, revision: str | None = None) -> tuple[str, dict[str, bytes]]:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo in self.private and "Authorization" not in request.headers:
            raise web.HTTPUnauthorized(headers={"X-Error-Message": "Invalid username or password."})
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if (revision or request.match_info["revision"]) not in ("main", "master", COMMIT):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        return repo, self.repos[repo]

    @staticmethod
    def _oid(body: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()  # git's blob id, as the Hub gives it

    async def info(self, request: web.Request) -> web.Response:
        repo, files = self._repo(request)
        self.listings.append(f"hf://{repo}")
        siblings = [{"rfilename": name, "size": len(body), "blobId": self._oid(body)} for name, body in files.items()]
        return web.json_response({"id": repo, "sha": COMMIT, "siblings": siblings, "private": repo in self.private})

    async def tree(self, request: web.Request) -> web.Response:
        _repo, files = self._repo(request)
        return web.json_response([{"type": "file", "path": name, "size": len(body), "oid": self._oid(body)}
                                  for name, body in files.items()])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        _repo, files = self._repo(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        return await self._send(request, path, files[path])

    async def _send(self, request: web.Request, path: str, body: bytes) -> web.StreamResponse:
        """A file body, whole or the byte range asked for (`bytes=A-B`: a partial read; `bytes=A-`: a resume)."""
        start, end = 0, len(body) - 1
        ranged = request.headers.get("Range", "")
        partial = False
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start = int(first)
            if last:
                end, partial = min(int(last), len(body) - 1), True
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self._oid(body)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
        if partial and self.refuse_ranges:
            raise web.HTTPRequestRangeNotSatisfiable()
        if partial:
            self.ranges.append((path, start, end))  # a header read: not a download, never held by the gate
        else:
            self.downloads.append(path)
        response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        response.content_length = end + 1 - start
        await response.prepare(request)
        if path == self.gated_file and not partial:
            await self.gate.wait()
        await response.write(body[start:end + 1])
        await response.write_eof()
        return response

    async def ms_files(self, request: web.Request) -> web.Response:
        repo, files = self._repo(request, request.query.get("Revision", "master"))
        self.listings.append(f"ms://{repo}")
        return web.json_response({"Code": 200, "Success": True, "Data": {"Files": [
            {"Path": name, "Name": name.rsplit("/", 1)[-1], "Size": len(body), "Type": "blob"}
            for name, body in files.items()]}})

    async def ms_file(self, request: web.Request) -> web.StreamResponse:
        _repo, files = self._repo(request, request.query.get("Revision", "master"))
        path = request.query.get("FilePath", "")
        if path not in files:
            raise web.HTTPNotFound()
        return await self._send(request, path, files[path])
