"""`lsbert status` against a predictor with basic auth: it sends the credentials of its environment (inside the
predictor pod, the predictor's own) and says so when the answer hides projects and training."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from lsbert.status import print_status

USER, PASSWORD = "ls", "pw-status-test"
DETAILS = {
    "baseline": "some/baseline",
    "serving": {"2": "ft-0001"},
    "training": {"2": {"active": {"version": "ft-0002", "phase": "pending", "message": "FailedMount: no dir"}}},
}


class _Predictor(BaseHTTPRequestHandler):
    """The /health contract of a predictor with basic auth: details only for the right credentials."""

    def do_GET(self) -> None:
        good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        body = {"status": "UP", "model_class": "lsbert", "ready": True}
        if self.headers.get("Authorization") == good:
            body.update(DETAILS)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def predictor_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Predictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_status_sends_the_environments_basic_auth(predictor_url, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.setenv("BASIC_AUTH_PASS", PASSWORD)
    assert print_status(predictor_url) == 0
    out = capsys.readouterr().out
    assert "baseline some/baseline" in out, out
    assert "project 2: serving ft-0001; training ft-0002 (pending): FailedMount: no dir" in out, out


def test_status_without_credentials_says_what_is_hidden(predictor_url, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BASIC_AUTH_USER", raising=False)
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    assert print_status(predictor_url) == 0
    out = capsys.readouterr().out
    assert "projects and training hidden: basic auth is on" in out, out
    assert "no projects yet" not in out and "baseline None" not in out, out
