"""A stand-in for Grafana's HTTP API, to test ``wattstream dashboards push`` for real.

Grafana itself is not installable on these machines (no Debian package, nothing on
PyPI or npm runs the server, no Docker engine: see /work/shared/SERVERS.md), so this
is a real HTTP server on a free loopback port that implements the subset of
Grafana's documented HTTP API (https://grafana.com/docs/grafana/latest/developers/http_api/)
that grafana-client calls for a push, with the status codes and answer shapes the
documentation gives:

* Authentication: ``Authorization: Bearer <service account token>``; a missing or
  unknown token is 401 ``{"message": "Unauthorized"}``. A token of a Viewer may read
  but not write: 403.
* Folders: ``GET /api/folders``, ``GET /api/folders/:uid`` (404 when unknown),
  ``POST /api/folders`` (409 when the uid or the title is taken), ``PUT /api/folders/:uid``.
* Dashboards: ``POST /api/dashboards/db`` creates or updates by uid. Without
  ``overwrite``, an existing uid is 400 (no id given) or 412 ``version-mismatch``, and
  another dashboard of the same title in the folder is 412 ``name-exists``; with it,
  the dashboard is replaced. Each save bumps ``version``. ``GET /api/dashboards/uid/:uid``
  returns ``{"dashboard", "meta"}`` (404 when unknown).
* Search: ``GET /api/search`` with ``query``, ``type`` (``dash-db``/``dash-folder``),
  ``folderUIDs`` and ``dashboardUIDs``.
* ``GET /api/health``, unauthenticated, as in Grafana.

State lives in memory; every request is recorded in ``requests`` (method, path).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

VERSION = "12.2.0"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


@dataclass
class Answer:
    status: int
    body: Any


@dataclass
class GrafanaState:
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    """By uid: {"dashboard": model, "folderUid": ..., "version": n, "message": ...}."""
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


class GrafanaAPI:
    """The server; ``url`` is Grafana's base URL (with ``path_prefix`` when it is served
    under a sub-path, as behind a reverse proxy)."""

    def __init__(
        self, token: str, *, viewer_token: str | None = None, path_prefix: str = ""
    ) -> None:
        self.token = token
        self.viewer_token = viewer_token
        self.path_prefix = path_prefix.rstrip("/")
        self.state = GrafanaState()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.path_prefix}"

    def start(self) -> Self:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def do_PUT(self) -> None:
                self._answer("PUT")

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                answer = api.handle(method, self.path, self.headers.get("Authorization"), raw)
                body = json.dumps(answer.body).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # the test output is no place for an access log

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="grafana-api", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the API ----------------------------------------------------------------------------

    def handle(self, method: str, target: str, authorization: str | None, raw: bytes) -> Answer:
        parts = urlsplit(target)
        path = parts.path
        with self._lock:
            self.requests.append((method, path))
            if not path.startswith(self.path_prefix + "/api/"):
                return Answer(404, {"message": "Not found"})
            path = path[len(self.path_prefix) :]
            if method == "GET" and path == "/api/health":
                return Answer(200, {"database": "ok", "version": VERSION})
            if authorization not in (f"Bearer {self.token}", f"Bearer {self.viewer_token}"):
                return Answer(401, {"message": "Unauthorized"})
            if method != "GET" and authorization == f"Bearer {self.viewer_token}":
                return Answer(
                    403,
                    {
                        "message": "You'll need additional permissions to perform this action. "
                        "Permissions needed: dashboards:write"
                    },
                )
            try:
                body = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                return Answer(400, {"message": "bad request data"})
            return self._route(method, path, parse_qs(parts.query), body)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Answer:
        if path == "/api/folders":
            if method == "GET":
                return Answer(200, [self._folder_brief(f) for f in self.state.folders.values()])
            if method == "POST":
                return self._create_folder(body)
        if match := re.fullmatch(r"/api/folders/([^/]+)", path):
            folder = self.state.folders.get(match.group(1))
            if folder is None:
                return Answer(404, {"message": "folder not found", "status": "not-found"})
            if method == "GET":
                return Answer(200, folder)
            if method == "PUT":
                return self._update_folder(folder, body)
        if path == "/api/dashboards/db" and method == "POST":
            return self._save_dashboard(body)
        if (match := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path)) and method == "GET":
            return self._get_dashboard(match.group(1))
        if path == "/api/search" and method == "GET":
            return Answer(200, self._search(query))
        return Answer(404, {"message": "Not found"})

    def _folder_brief(self, folder: dict[str, Any]) -> dict[str, Any]:
        return {"id": folder["id"], "uid": folder["uid"], "title": folder["title"]}

    def _create_folder(self, body: dict[str, Any]) -> Answer:
        title = str(body.get("title") or "")
        if not title:
            return Answer(400, {"message": "folder title cannot be empty"})
        uid = str(body.get("uid") or f"f{self.state.next_id}")
        if uid in self.state.folders:
            return Answer(409, {"message": "a folder with the same uid already exists"})
        if any(f["title"] == title for f in self.state.folders.values()):
            return Answer(409, {"message": "a folder with the same name already exists"})
        folder = {
            "id": self.state.new_id(),
            "uid": uid,
            "title": title,
            "url": f"/dashboards/f/{uid}/{slugify(title)}",
            "version": 1,
        }
        self.state.folders[uid] = folder
        return Answer(200, folder)

    def _update_folder(self, folder: dict[str, Any], body: dict[str, Any]) -> Answer:
        if not body.get("overwrite") and body.get("version") != folder["version"]:
            return Answer(
                412,
                {
                    "message": "the folder has been changed by someone else",
                    "status": "version-mismatch",
                },
            )
        if body.get("title"):
            folder["title"] = body["title"]
            folder["url"] = f"/dashboards/f/{folder['uid']}/{slugify(body['title'])}"
        folder["version"] += 1
        return Answer(200, folder)

    def _save_dashboard(self, body: dict[str, Any]) -> Answer:
        model = body.get("dashboard")
        if not isinstance(model, dict) or not model.get("title"):
            return Answer(400, {"message": "Dashboard title cannot be empty"})
        folder_uid = str(body.get("folderUid") or "")
        if folder_uid and folder_uid not in self.state.folders:
            return Answer(400, {"message": "folder not found"})
        overwrite = bool(body.get("overwrite"))
        uid = str(model.get("uid") or f"d{self.state.next_id}")
        existing = self.state.dashboards.get(uid)
        if existing is not None and not overwrite:
            if model.get("id") is None:
                return Answer(400, {"message": "A dashboard with the same uid already exists"})
            if model.get("version") != existing["version"]:
                return Answer(
                    412,
                    {
                        "message": "The dashboard has been changed by someone else",
                        "status": "version-mismatch",
                    },
                )
        namesake = next(
            (
                other_uid
                for other_uid, saved in self.state.dashboards.items()
                if other_uid != uid
                and saved["folderUid"] == folder_uid
                and saved["dashboard"]["title"] == model["title"]
            ),
            None,
        )
        if namesake is not None:
            if not overwrite:
                return Answer(
                    412,
                    {
                        "message": "A dashboard with the same name in the folder already exists",
                        "status": "name-exists",
                    },
                )
            del self.state.dashboards[namesake]
        version = existing["version"] + 1 if existing else 1
        dashboard_id = existing["dashboard"]["id"] if existing else self.state.new_id()
        saved_model = {**model, "id": dashboard_id, "uid": uid, "version": version}
        self.state.dashboards[uid] = {
            "dashboard": saved_model,
            "folderUid": folder_uid,
            "version": version,
            "message": body.get("message", ""),
        }
        slug = slugify(model["title"])
        return Answer(
            200,
            {
                "id": dashboard_id,
                "uid": uid,
                "url": f"/d/{uid}/{slug}",
                "status": "success",
                "version": version,
                "slug": slug,
                "folderUid": folder_uid,
            },
        )

    def _get_dashboard(self, uid: str) -> Answer:
        saved = self.state.dashboards.get(uid)
        if saved is None:
            return Answer(404, {"message": "Dashboard not found"})
        folder = self.state.folders.get(saved["folderUid"])
        slug = slugify(saved["dashboard"]["title"])
        return Answer(
            200,
            {
                "dashboard": saved["dashboard"],
                "meta": {
                    "type": "db",
                    "slug": slug,
                    "url": f"/d/{uid}/{slug}",
                    "version": saved["version"],
                    "folderUid": saved["folderUid"],
                    "folderTitle": folder["title"] if folder else "General",
                    "provisioned": False,
                },
            },
        )

    def _search(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        text = query.get("query", [""])[0].lower()
        kinds = set(query.get("type", ["dash-folder", "dash-db"]))
        folder_uids = set(query.get("folderUIDs", []))
        dashboard_uids = set(query.get("dashboardUIDs", []))
        hits: list[dict[str, Any]] = []
        if "dash-folder" in kinds and not folder_uids and not dashboard_uids:
            hits.extend(
                {**self._folder_brief(f), "type": "dash-folder", "url": f["url"]}
                for f in self.state.folders.values()
                if text in f["title"].lower()
            )
        if "dash-db" in kinds:
            for uid, saved in self.state.dashboards.items():
                model = saved["dashboard"]
                if text not in model["title"].lower():
                    continue
                if folder_uids and saved["folderUid"] not in folder_uids:
                    continue
                if dashboard_uids and uid not in dashboard_uids:
                    continue
                folder = self.state.folders.get(saved["folderUid"])
                hits.append(
                    {
                        "id": model["id"],
                        "uid": uid,
                        "title": model["title"],
                        "url": f"/d/{uid}/{slugify(model['title'])}",
                        "type": "dash-db",
                        "tags": model.get("tags", []),
                        "isStarred": False,
                        "folderUid": saved["folderUid"],
                        "folderTitle": folder["title"] if folder else "General",
                    }
                )
        return sorted(hits, key=lambda hit: (hit["type"], hit["title"]))
