"""A Hugging Face Hub stand-in on loopback, for tests that run the real huggingface_hub client.

It implements what `HfApi.create_repo`, `create_branch` and `create_commit` call — repo creation,
branch creation, README YAML validation, preupload (upload mode and the oid of what a path already
holds), the git-LFS batch API with basic transfers, the LFS PUT, the ndjson commit (inline and LFS
files, pull requests) and repo info — and records every request, so a test can assert what arrived.
`hold_after(n)` makes every LFS upload after the n-th block until `release()`: a client killed then
was interrupted mid-upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_MIN_BYTES = 10_000  # files at least this large, and all .safetensors, go through LFS


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, tuple[str, str, bytes | None]]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)  # {"revision", "summary", "files": [paths]}


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, as LFS storage keeps it (committed or not)
        self.puts: list[str] = []  # sha256 of every completed LFS upload, in order
        self.requests: list[tuple[str, str]] = []
        self.unauthorized: list[str] = []
        self._hold_after: int | None = None
        self._arrived = 0  # LFS uploads begun since hold_after
        self._held = threading.Event()  # set while some upload waits
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def hold_after(self, n: int) -> None:
        """The uploads that begin after the first `n` hang until `release` (counted as they begin: the
        client uploads in parallel, so counting finished ones could let every upload through)."""
        self._hold_after, self._held, self._release, self._arrived = n, threading.Event(), threading.Event(), 0

    def wait_held(self, timeout: float) -> bool:
        return self._held.wait(timeout)

    def release(self) -> None:
        self._hold_after = None
        self._release.set()

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """path -> content of a branch (or refs/pr/N)."""
        files = self.repos[repo_id].branches[revision]
        return {p: (self.lfs[oid] if kind == "lfs" else data) for p, (kind, oid, data) in files.items()}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, code: int, obj: object = None, ctype: str = "application/json") -> None:
            data = b"" if obj is None else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if code >= 400:
                self.send_header("X-Error-Message", (obj or {}).get("error", "error") if isinstance(obj, dict) else "error")
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            hub.unauthorized.append(self.path)
            self._send(401, {"error": "Invalid credentials"})
            return False

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^?]+)(\?.*)?", self.path)
            if m and self._authorized():
                repo = hub.repos.get(m.group(1))
                rev = m.group(2).replace("%2F", "/")
                if repo is None or rev not in repo.branches:
                    return self._send(404, {"error": "Repository not found"})
                sha = hashlib.sha1(json.dumps(sorted(repo.branches[rev])).encode()).hexdigest()
                return self._send(200, {"id": m.group(1), "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": p} for p in sorted(repo.branches[rev])]})  # fmt: skip
            if not m:
                self._send(404, {"error": f"not implemented: GET {self.path}"})

        def do_PUT(self) -> None:
            hub.requests.append(("PUT", self.path))
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            if not m:
                return self._send(404, {"error": "no such upload"})
            with hub._lock:
                hub._arrived += 1
                hold = hub._hold_after is not None and hub._arrived > hub._hold_after
            if hold:
                hub._held.set()
                hub._release.wait(60)
                return self._send(503, {"error": "interrupted"})
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return self._send(400, {"error": "sha256 mismatch"})
            with hub._lock:
                hub.lfs[m.group(1)] = data
                hub.puts.append(m.group(1))
            self._send(200)

        def do_POST(self) -> None:
            hub.requests.append(("POST", self.path))
            body = self._body()
            if not self._authorized():
                return
            path = self.path.split("?")[0]
            query = self.path.partition("?")[2]
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = Repo(bool(req.get("private")))
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._send(200, {})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
            lfs = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            repo_id = (m or lfs).group(1) if (m or lfs) else None
            repo = hub.repos.get(repo_id) if repo_id else None
            if repo is None:
                return self._send(404, {"error": "Repository not found"})
            if lfs:
                req = json.loads(body)
                objs = []
                for o in req["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                    if o["oid"] not in hub.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
                    objs.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objs}, "application/vnd.git-lfs+json")
            kind, rev = m.group(2), m.group(3).replace("%2F", "/")
            if kind == "branch":
                if rev in repo.branches:
                    return self._send(409, {"error": "Reference already exists"})
                repo.branches[rev] = dict(repo.branches["main"])
                return self._send(200, {})
            if rev not in repo.branches:
                return self._send(404, {"error": "Invalid rev id"})
            current = repo.branches[rev]
            if kind == "preupload":
                files = []
                for f in json.loads(body)["files"]:
                    mode = "lfs" if f["size"] >= LFS_MIN_BYTES or f["path"].endswith(".safetensors") else "regular"
                    held = current.get(f["path"])
                    files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                                  "oid": held[1] if held else None})  # fmt: skip
                return self._send(200, {"files": files, "commitOid": "0" * 40})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(v["value"] for v in lines if v["key"] == "header")
            new = dict(current)
            for item in lines:
                v = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(v["content"])
                    new[v["path"]] = ("regular", git_blob_sha1(data), data)
                elif item["key"] == "lfsFile":
                    if v["oid"] not in hub.lfs:
                        return self._send(400, {"error": f"LFS object {v['oid']} was never uploaded"})
                    new[v["path"]] = ("lfs", v["oid"], None)
            paths = [i["value"]["path"] for i in lines if i["key"] in ("file", "lfsFile")]
            target = rev
            pr_url = None
            if "create_pr=1" in query:
                target = f"refs/pr/{sum(b.startswith('refs/pr/') for b in repo.branches) + 1}"
                pr_url = f"{hub.url}/{repo_id}/discussions/{target.rsplit('/', 1)[1]}"
            repo.branches[target] = new
            repo.commits.append({"revision": target, "summary": header["summary"], "files": paths})
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
            return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": pr_url, "success": True})  # fmt: skip

    return Handler
