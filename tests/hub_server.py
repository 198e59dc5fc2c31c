"""A loopback stand-in for the Hugging Face Hub, so tests can drive the real `huggingface_hub` client.

It implements the endpoints that `huggingface_hub` 2.x calls to publish and to download a model repository:

| client call | endpoint |
|---|---|
| `create_repo` | `POST /api/repos/create` |
| `create_branch` | `POST /api/models/{repo}/branch/{branch}` |
| `create_commit` (card check) | `POST /api/validate-yaml` |
| `create_commit` (upload modes) | `POST /api/models/{repo}/preupload/{revision}` |
| LFS upload (basic transfer) | `POST /{repo}.git/info/lfs/objects/batch`, `PUT` to the returned href, `POST` verify |
| `list_repo_files` | `GET /api/models/{repo}/tree/{revision}?recursive=true` |
| `create_commit` (the commit, NDJSON) | `POST /api/models/{repo}/commit/{revision}` |
| `model_info` / `repo_info` | `GET /api/models/{repo}[/revision/{revision}]` |
| `list_repo_tree` | `GET /api/models/{repo}/tree/{revision}[/{path}]` |
| `hf_hub_download` | `HEAD`/`GET /{repo}/resolve/{revision}/{path}` |

Binary files (weights, ONNX, images) go through LFS and the rest as base64 in the commit, as on the Hub; Xet is
not spoken, so clients must run with `HF_HUB_DISABLE_XET=1`. Writes need `Authorization: Bearer <token>` with the
server's token; a rejected token gets the Hub's 401 answer. `fail_commit_with = 500` makes the commit endpoint
fail after every upload has arrived; `echo_authorization = True` makes that failure repeat the request's
`Authorization` header (and another token-shaped string) in its body, as a careless proxy might. Committed files are also written under `storage/<user>/<name>/<revision>/`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Paths the Hub's default .gitattributes sends through LFS.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.onnx", "*.onnx.data", "*.png", "*.pt", "*.pkl", "*.ckpt")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
INVALID_TOKEN = "Invalid credentials in Authorization header"
ECHOED_TOKEN = "hf_someoneElsesTokenEchoed0123456789"  # a token-shaped string in an echoed error body


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    paths: list[str]  # added or replaced
    oid: str
    deleted: list[str] = field(default_factory=list)


@dataclass
class Request:
    method: str
    path: str
    body: bytes  # the request body as received (the Authorization header is deliberately not kept)


@dataclass
class Branch:
    sha: str
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # paths stored through LFS


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LoopbackHub:
    """The Hub on `127.0.0.1`: `with LoopbackHub(tmp_path, token) as hub:` then point `HF_ENDPOINT` at
    `hub.endpoint`."""

    def __init__(self, storage: Path, token: str) -> None:
        self.storage = Path(storage)
        self.token = token
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: Branch}}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.fail_commit_with: int | None = None
        self.echo_authorization = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def uploaded_bytes(self) -> bytes:
        """Every request body the server received, concatenated (commit payloads, LFS objects, cards...)."""
        return b"".join(request.body for request in self.requests)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id]["branches"][revision].files)

    def storage_folder(self, repo_id: str, revision: str = "main") -> Path:
        return self.storage / repo_id / revision

    # --- Repository state (called with the lock held). ---

    def commit(self, repo_id: str, revision: str, payload: bytes) -> Commit:
        lines = [json.loads(line) for line in payload.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        branch = self.repos[repo_id]["branches"][revision]
        files, lfs = dict(branch.files), set(branch.lfs)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif line["key"] == "lfsFile":
                files[value["path"]] = self.lfs_objects[value["oid"]]  # KeyError -> 400: never uploaded
                lfs.add(value["path"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"])  # KeyError -> 400: no such file
                lfs.discard(value["path"])
            elif line["key"] != "header":
                raise ValueError(f"unsupported commit operation {line['key']!r}")
        paths = [line["value"]["path"] for line in lines if line["key"] in ("file", "lfsFile")]
        deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
        oid = hashlib.sha1(payload + branch.sha.encode()).hexdigest()
        branch.files, branch.lfs, branch.sha = files, lfs, oid
        folder = self.storage_folder(repo_id, revision)
        for path in paths:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(files[path])
        for path in deleted:
            (folder / path).unlink(missing_ok=True)
        commit = Commit(repo_id, revision, header["summary"], header.get("description", ""), paths, oid, deleted)
        self.commits.append(commit)
        return commit

    def file_entry(self, branch: Branch, path: str) -> dict:
        content = branch.files[path]
        entry = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}
        if path in branch.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return entry


def _handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # keep pytest output clean
            pass

        # --- Plumbing. ---

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def reply(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
            if body is None:
                body = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, status: int, message: str, code: str | None = None) -> None:
            self.reply(status, {"error": message}, headers={"X-Error-Code": code} if code else None)

        def authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self.error(401, INVALID_TOKEN)
            return False

        def route(self, method: str) -> None:
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            body = self.read_body() if method in ("POST", "PUT") else b""
            with hub.lock:
                hub.requests.append(Request(method, url.path, body))
            for route_method, pattern, action in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    groups = {name: unquote(value) if value else value for name, value in match.groupdict().items()}
                    with hub.lock:
                        return action(self, body, **groups)
            self.error(404, f"no route for {method} {url.path}")

        def do_GET(self) -> None:
            self.route("GET")

        def do_HEAD(self) -> None:
            self.route("HEAD")

        def do_POST(self) -> None:
            self.route("POST")

        def do_PUT(self) -> None:
            self.route("PUT")

        # --- Lookups. ---

        def branch(self, repo: str, revision: str, write: bool = False) -> Branch | None:
            state = hub.repos.get(repo)
            readable = state is not None and (not state["private"] or self.headers.get("Authorization") == f"Bearer {hub.token}")
            if not readable:
                self.error(404 if write else 401, "Repository not found", "RepoNotFound")
                return None
            revision = revision or "main"
            if revision not in state["branches"]:
                matching = [b for b in state["branches"].values() if b.sha == revision]
                if not matching or write:
                    self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return None
                return matching[0]
            return state["branches"][revision]

        # --- Endpoints. ---

        def validate_yaml(self, body: bytes) -> None:
            content = json.loads(body)["content"]
            match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
                if not isinstance(metadata, dict):
                    raise ValueError("the metadata block is missing or not a mapping")
            except (yaml.YAMLError, ValueError) as error:
                return self.reply(400, {"errors": [{"message": str(error)}], "warnings": []})
            self.reply(200, {"errors": [], "warnings": []})

        def create_repo(self, body: bytes) -> None:
            if not self.authorized():
                return
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub's 409 names the existing repository, which the client returns
                return self.reply(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
            # huggingface_hub >= 1.0 sends "visibility"; older releases send "private": true. The Hub takes both.
            private = payload.get("visibility") == "private" or payload.get("private") is True
            hub.repos[repo_id] = {"private": private, "branches": {"main": Branch(sha=git_blob_sha1(repo_id.encode()))}}
            self.reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def create_branch(self, body: bytes, repo: str, branch: str) -> None:
            if not self.authorized() or (main := self.branch(repo, "main", write=True)) is None:
                return
            branches = hub.repos[repo]["branches"]
            if branch in branches:
                return self.error(409, "Reference already exists")
            branches[branch] = Branch(sha=main.sha, files=dict(main.files), lfs=set(main.lfs))
            self.reply(200, {})

        def preupload(self, body: bytes, repo: str, revision: str) -> None:
            if not self.authorized() or self.branch(repo, revision, write=True) is None:
                return
            files = [
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if any(fnmatch.fnmatch(file["path"], p) for p in LFS_PATTERNS) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for file in json.loads(body)["files"]
            ]
            self.reply(200, {"files": files})

        def lfs_batch(self, body: bytes, repo: str) -> None:
            if not self.authorized() or repo not in hub.repos:
                return
            objects = [
                {
                    "oid": obj["oid"],
                    "size": obj["size"],
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/lfs-verify/{obj['oid']}"},
                    },
                }
                for obj in json.loads(body)["objects"]
            ]
            self.reply(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self.error(400, "content does not match its sha256")
            hub.lfs_objects[oid] = body
            self.reply(200, {})

        def lfs_verify(self, body: bytes, oid: str) -> None:
            if not self.authorized():
                return
            self.reply(200, {}) if oid in hub.lfs_objects else self.error(404, "object not uploaded")

        def create_commit(self, body: bytes, repo: str, revision: str) -> None:
            if not self.authorized() or self.branch(repo, revision, write=True) is None:
                return
            if hub.fail_commit_with is not None:
                if hub.echo_authorization:
                    return self.error(hub.fail_commit_with, f"Bad gateway; request headers were Authorization: "
                                      f"{self.headers.get('Authorization')}, X-Forwarded-Token: {ECHOED_TOKEN}")
                return self.error(hub.fail_commit_with, "Internal Error - We're working hard to fix this as soon as possible!")
            try:
                commit = hub.commit(repo, revision, body)
            except (KeyError, ValueError) as error:
                return self.error(400, f"invalid commit: {error}")
            self.reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                             "pullRequestUrl": None, "success": True})

        def model_info(self, body: bytes, repo: str, revision: str | None = None) -> None:
            if (branch := self.branch(repo, revision)) is None:
                return
            self.reply(200, {
                "id": repo, "modelId": repo, "sha": branch.sha, "private": hub.repos[repo]["private"],
                "siblings": [{"rfilename": path} for path in sorted(branch.files)],
            })

        def tree(self, body: bytes, repo: str, revision: str, path: str | None = None) -> None:
            if (branch := self.branch(repo, revision)) is None:
                return
            prefix = f"{path.strip('/')}/" if path else ""
            recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
            entries, folders = [], set()
            for name in sorted(branch.files):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append(hub.file_entry(branch, name))
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries += [{"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())} for folder in sorted(folders)]
            self.reply(200, entries)

        def resolve(self, body: bytes, repo: str, revision: str, path: str) -> None:
            if (branch := self.branch(repo, revision)) is None:
                return
            if path not in branch.files:
                return self.error(404, "Entry not found", "EntryNotFound")
            content = branch.files[path]
            entry = hub.file_entry(branch, path)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": branch.sha, "ETag": f'"{etag}"'}
            range_header = self.headers.get("Range")
            if range_header and (match := re.fullmatch(r"bytes=(\d+)-", range_header)):
                start = int(match.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
                return self.reply(206, headers=headers, body=content[start:])
            self.reply(200, headers=headers, body=content)

        def whoami(self, body: bytes) -> None:
            if self.authorized():
                self.reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})

    ROUTES = [
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("GET", r"/api/whoami-v2", Handler.whoami),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", Handler.create_branch),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", Handler.preupload),
        ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", Handler.create_commit),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_upload),
        ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", Handler.lfs_verify),
        ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", Handler.tree),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", Handler.model_info),
        ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", Handler.resolve),
        ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", Handler.resolve),
    ]
    return Handler
