"""A local stand-in of the Hugging Face Hub's HTTP API (tests only): the endpoints ``huggingface_hub``'s
``create_repo`` and ``upload_folder`` call, served on 127.0.0.1 so the real client runs end to end.

- ``POST /api/repos/create``: records the repo (type, visibility); 409 when it exists (``exist_ok`` handles it).
- ``POST /api/validate-yaml``: the client's check of a ``README.md``'s front matter before upload; the
  stand-in parses it (a mapping of YAML) and records it in ``Hub.validated``.
- ``POST /api/{type}s/{repo}/preupload/{revision}``: answers every file ``uploadMode: regular``, so the bytes
  travel base64 inside the commit. The real Hub sends large and binary files through its Xet/LFS storage,
  which this stand-in does not implement; everything else is the client's real path.
- ``POST /api/{type}s/{repo}/commit/{revision}``: the ndjson commit (header + files); stores the files.

``Hub.repos``: ``{(type, repo_id): {"private": bool, "files": {path: bytes}, "commits": [summary, ...]}}``;
``Hub.tokens``: the bearer tokens seen.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


class Hub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokens: list[str] = []
        self.calls: list[str] = []
        self.validated: list[tuple[str, dict[str, Any]]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                auth = self.headers.get("Authorization", "")
                hub.tokens.append(auth.removeprefix("Bearer "))
                hub.calls.append(f"POST {self.path}")
                try:
                    code, body = hub.handle(self.path, raw)
                except Exception as e:  # noqa: BLE001 - a stand-in bug shows as a 500 the client reports
                    code, body = 500, {"error": repr(e)}
                self._reply(code, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        path = path.split("?", 1)[0]
        if path == "/api/repos/create":
            req = json.loads(raw)
            kind = req.get("type") or "model"
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if (kind, repo_id) in self.repos:
                return 409, {"error": "You already created this repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[kind, repo_id] = {"private": req.get("visibility") == "private", "files": {}, "commits": []}
            return 200, {"url": f"{self.endpoint}/{'' if kind == 'model' else kind + 's/'}{repo_id}"}
        if path == "/api/validate-yaml":
            req = json.loads(raw)
            parts = req["content"].split("---\n")
            meta = yaml.safe_load(parts[1]) if req["content"].startswith("---\n") and len(parts) > 2 else None
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "the README has no YAML front matter mapping"}]}
            self.validated.append((req["repoType"], meta))
            return 200, {"warnings": []}
        m = re.fullmatch(r"/api/(model|dataset)s/(.+)/(preupload|commit)/([^/]+)", path)
        if m is None:
            return 404, {"error": f"not implemented by the stand-in: {path}"}
        kind, repo_id, action, _revision = m.groups()
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            return 404, {"error": "Repository not found"}
        if action == "preupload":
            files = json.loads(raw)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        for item in lines:
            if item["key"] == "header":
                repo["commits"].append(item["value"]["summary"])
            elif item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return 400, {"error": f"the stand-in takes regular files only, got {item['key']}"}
        oid = f"{len(repo['commits']):040x}"
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}
