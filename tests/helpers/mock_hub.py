"""A small Hub-API server on 127.0.0.1 for push tests (no network): the endpoints huggingface_hub's
create_repo / create_branch / repo_info / list_repo_tree / create_commit use, with plain LFS
uploads (tests set HF_HUB_DISABLE_XET). It keeps every commit, so tests can count them."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

_LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".png")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's object id


class MockHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.auth_seen: set[str] = set()
        self.cards: list[dict[str, Any]] = []  # README metadata the client asked to validate
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                return

            def _send(self, code: int, obj: Any = None) -> None:
                raw = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self, method: str) -> None:
                if self.headers.get("Authorization"):
                    hub.auth_seen.add(self.headers["Authorization"])
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    code, obj = hub.route(method, path, self._body() if method in ("POST", "PUT") else b"")
                self._send(code, obj)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> MockHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state helpers for tests
    def commits(self, repo_type: str, repo_id: str, branch: str = "main") -> int:
        """Commits on the branch after the repo's initial one."""
        return len(self.repos[(repo_type, repo_id)]["branches"][branch]) - 1

    def files(self, repo_type: str, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        head = self.repos[(repo_type, repo_id)]["branches"][branch][-1]
        return {p: self.blobs[o] for p, o in head["files"].items()}

    # -- the API
    def _commit(self, repo: dict[str, Any], branch: str, files: dict[str, str], msg: str) -> str:
        oid = hashlib.sha1(
            f"{branch}:{len(repo['branches'][branch])}:{msg}:{sorted(files.items())}".encode()
        ).hexdigest()  # noqa: S324
        repo["branches"][branch].append({"oid": oid, "files": dict(files), "message": msg})
        return oid

    def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "POST" and path == "/api/repos/create":
            d = json.loads(body)
            rtype = d.get("type") or "model"
            rid = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
            prefix = "" if rtype == "model" else f"{rtype}s/"
            if (rtype, rid) in self.repos:  # the Hub answers 409 with the repo's url
                return 409, {"error": "You already created this repo", "url": f"{self.url}/{prefix}{rid}"}
            repo = {"private": d.get("visibility") == "private", "branches": {"main": []}}
            ga = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
            self.blobs[_git_sha1(ga)] = ga
            self._commit(repo, "main", {".gitattributes": _git_sha1(ga)}, "initial commit")
            self.repos[(rtype, rid)] = repo
            return 200, {"url": f"{self.url}/{prefix}{rid}"}
        if method == "POST" and path == "/api/validate-yaml":
            import yaml

            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "README.md has no YAML metadata block"}]}
            self.cards.append(meta)
            return 200, {"errors": [], "warnings": []}
        m = re.match(r"^/api/(model|dataset)s/([^/]+/[^/]+)(/.*)?$", path)
        if m:
            rtype, rid, rest = m.group(1), m.group(2), m.group(3) or ""
            repo = self.repos.get((rtype, rid))
            if repo is None:
                return 404, {"error": "Repository not found"}
            return self._repo_api(method, rtype, rid, repo, rest, body)
        m = re.match(r"^/(?:datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path)
        if m and method == "POST":
            d = json.loads(body)
            objs = []
            for o in d["objects"]:
                if o["oid"] in self.blobs:
                    objs.append({"oid": o["oid"], "size": o["size"]})
                else:
                    objs.append(
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
                        }
                    )
            return 200, {"transfer": "basic", "objects": objs}
        m = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
        if m and method == "PUT":
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return 400, {"error": "sha256 mismatch"}
            self.blobs[m.group(1)] = body
            return 200, {}
        return 404, {"error": f"no route {method} {path}"}

    def _repo_api(
        self, method: str, rtype: str, rid: str, repo: dict[str, Any], rest: str, body: bytes
    ) -> tuple[int, Any]:
        m = re.match(r"^/branch/([^/]+)$", rest)
        if m and method == "POST":
            if m.group(1) in repo["branches"]:
                return 409, {"error": "branch exists"}
            repo["branches"][m.group(1)] = [dict(repo["branches"]["main"][-1])]
            return 200, {}
        m = re.match(r"^(?:/revision/([^/]+))?$", rest)
        if m and method == "GET":
            head = repo["branches"].get(m.group(1) or "main")
            if head is None:
                return 404, {"error": "Revision not found"}
            h = head[-1]
            return 200, {
                "id": rid,
                "sha": h["oid"],
                "private": repo["private"],
                "siblings": [{"rfilename": p} for p in h["files"]],
            }
        m = re.match(r"^/tree/([^/]+)(/.*)?$", rest)
        if m and method == "GET":
            h = repo["branches"][m.group(1)][-1]
            out = []
            for p, oid in sorted(h["files"].items()):
                data = self.blobs[oid]
                item: dict[str, Any] = {"type": "file", "path": p, "size": len(data), "oid": _git_sha1(data)}
                if p.endswith(_LFS_SUFFIXES):
                    item["lfs"] = {"oid": oid, "size": len(data), "pointerSize": 130}
                out.append(item)
            return 200, out
        m = re.match(r"^/preupload/([^/]+)$", rest)
        if m and method == "POST":
            h = repo["branches"][m.group(1)][-1]
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(_LFS_SUFFIXES)
                remote = h["files"].get(f["path"])
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": remote})  # fmt: skip
            return 200, {"files": files}
        m = re.match(r"^/commit/([^/]+)$", rest)
        if m and method == "POST":
            branch = m.group(1)
            files = dict(repo["branches"][branch][-1]["files"])
            msg = ""
            for line in body.splitlines():
                item = json.loads(line)
                k, v = item["key"], item["value"]
                if k == "header":
                    msg = v["summary"]
                elif k == "file":
                    data = base64.b64decode(v["content"])
                    self.blobs[_git_sha1(data)] = data
                    files[v["path"]] = _git_sha1(data)
                elif k == "lfsFile":
                    if v["oid"] not in self.blobs:
                        return 400, {"error": f"LFS object {v['oid']} was never uploaded"}
                    files[v["path"]] = v["oid"]
                elif k == "deletedFile":
                    files.pop(v["path"], None)
            oid = self._commit(repo, branch, files, msg)
            prefix = "" if rtype == "model" else f"{rtype}s/"
            return 200, {
                "commitOid": oid,
                "commitUrl": f"{self.url}/{prefix}{rid}/commit/{oid}",
                "success": True,
            }
        return 404, {"error": f"no route {method} {rest}"}
