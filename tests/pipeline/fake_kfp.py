"""A tiny stand-in for the Kubeflow Pipelines API server (the v2beta1 REST endpoints kfp.Client calls to create an
experiment, a run and a recurring run), on 127.0.0.1. It records every request, so a test can check what the real
``kfp.Client`` sent: the compiled pipeline spec, the arguments, the cron schedule. A real cluster cannot run here."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeKFP:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else None

            def _answer(self, method: str) -> None:
                body = self._body()
                fake.requests.append({"method": method, "path": self.path, "body": body})
                path = self.path.split("?")[0]
                if path.endswith("/experiments") and method == "GET":
                    reply: dict[str, Any] = {"experiments": [], "total_size": 0}
                elif path.endswith("/experiments"):
                    reply = {"experiment_id": "exp-1", "display_name": (body or {}).get("display_name")}
                elif path.endswith("/runs") and method == "POST":
                    reply = {"run_id": "run-1", "display_name": (body or {}).get("display_name"), "state": "PENDING"}
                elif path.endswith("/recurringruns") and method == "POST":
                    reply = {"recurring_run_id": "rr-1", "display_name": (body or {}).get("display_name")}
                elif "healthz" in path:
                    reply = {"multi_user": False}
                else:
                    reply = {}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKFP:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
