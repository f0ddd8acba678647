"""A stand-in for the Hugging Face Hub on 127.0.0.1 that answers every request with one HTTP error (as the
hub does: status and X-Error-Code), or answers nothing for a while; and a runner of a stage as a subprocess
pointed at it, for tests of what each stage says when the hub fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.dvc_stages import stage_command

ROOT = Path(__file__).resolve().parents[1]


class HubStub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int = 404, error_code: str | None = None, error_message: str | None = None,
                 delay: float = 0.0):
        self.status, self.error_code, self.error_message, self.delay = status, error_code, error_message, delay
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: HubStub

    def _answer(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        time.sleep(self.server.delay)
        body = b'{"error": "stub"}'
        self.send_response(self.server.status)
        if self.server.error_code:
            self.send_header("X-Error-Code", self.server.error_code)
        if self.server.error_message:
            self.send_header("X-Error-Message", self.server.error_message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):  # the client may have given up already
                self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, format, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def hub_stub(**answer):
    server = HubStub(**answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_stage(module: str, cwd: Path, endpoint: str, **env: str) -> tuple[int, str, float]:
    """Run `python -m module` in cwd against the hub at endpoint, online, with an empty Hugging Face cache
    and no token; returns (exit code, stdout + stderr, seconds)."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    environ |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(cwd / "hf-home"), "PYTHONPATH": str(ROOT), **env}
    started = time.perf_counter()
    result = subprocess.run(stage_command(module.removeprefix("stages.")), cwd=cwd, env=environ,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - started
