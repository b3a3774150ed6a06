"""Real servers on the loopback for the remote-shard tests (tests/conftest.py makes fixtures of them).

`FaultyHTTPServer`: the standard library's threading HTTP server serving a folder (GET, HEAD; a
folder URL answers http.server's own HTML listing of it, an autoindex),
with the faults a link has: the next N answers are 500, the next transfer of a file is cut short
(the headers announce the whole length, half the bytes come, the connection closes), a throttle
to B bytes/s, and stop()/start() again on the same port (a server gone mid-epoch).

`MotoServer`: moto's standalone S3 API server (`python -m moto.server`) in a process of its own
on a free port, driven through boto3 like any S3 endpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # start() again on the port stop() left (its connections in TIME_WAIT)
    daemon_threads = True


class FaultyHTTPServer:
    """Serves `root` at http://127.0.0.1:PORT/. Fault controls: `fail_next(n)`, `cut_next(name)`,
    `throttle(bytes_per_s)`; `stop()` and `start()` again on the same port. `requests` counts the
    GETs per served path (e.g. "set/a.tar"), to tell how often a file was fetched."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.requests: dict[str, int] = {}
        self._failures, self._cuts, self._rate = 0, {}, None
        self._lock = threading.Lock()
        self._httpd = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        server = self

        class Handler(SimpleHTTPRequestHandler):  # for its list_directory: GET and HEAD are ours
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def log_message(self, *args):  # quiet: pytest shows stderr of failing tests
                pass

            def _answer(self, body: bool):
                name = unquote(urlsplit(self.path).path).lstrip("/")
                with server._lock:
                    if body:
                        server.requests[name] = server.requests.get(name, 0) + 1
                    fail = server._failures > 0
                    server._failures -= fail
                    cut = body and server._cuts.get(name, 0) > 0
                    if cut:
                        server._cuts[name] -= 1
                    rate = server._rate
                path = (server.root / name).resolve()
                if fail:
                    return self.send_error(500, "Internal Server Error (injected)")
                if name.endswith("/") or not name:
                    if not path.is_dir() or (server.root.resolve() not in path.parents and path != server.root.resolve()):
                        return self.send_error(404, "Not Found")
                    listing = self.list_directory(str(path))  # the standard library's autoindex page
                    if listing is not None and body:
                        self.wfile.write(listing.read())
                    return
                if not path.is_file() or server.root.resolve() not in path.parents:
                    return self.send_error(404, "Not Found")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))  # the whole length, also when cut
                self.end_headers()
                if body:
                    self._send(data[: len(data) // 2] if cut else data, rate)
                self.close_connection = True

            def _send(self, data: bytes, rate: int | None):
                step = max(1, rate // 20) if rate else 1 << 16  # throttled: a twentieth of a second's bytes at a time
                try:
                    for at in range(0, len(data), step):
                        self.wfile.write(data[at:at + step])
                        if rate:
                            time.sleep(step / rate)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up or the server stopped
                    pass

        self._httpd = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Stops listening (the port then refuses connections) until start()."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def fail_next(self, n: int) -> None:
        """The next `n` requests are answered 500."""
        with self._lock:
            self._failures = n

    def cut_next(self, name: str, times: int = 1) -> None:
        """The next `times` GETs of `name` (a path under root) send half the bytes, then close."""
        with self._lock:
            self._cuts[name] = times

    def throttle(self, bytes_per_s: int | None) -> None:
        """Bodies are sent at `bytes_per_s` (None: as fast as they go)."""
        with self._lock:
            self._rate = bytes_per_s


class MotoServer:
    """moto's S3 API server in its own process on a free loopback port. `check_credentials`:
    moto then refuses keys it does not know (INITIAL_NO_AUTH_ACTION_COUNT=0), the real
    "credentials refused" answer."""

    def __init__(self, check_credentials: bool = False):
        self.port = free_port()
        env = {**os.environ}
        for key in [k for k in env if k.startswith("AWS_")]:
            env.pop(key)
        if check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class S3Bucket:
    """A new bucket on a MotoServer, with the test's AWS variables already set (the `s3` fixture)."""

    def __init__(self, name: str):
        import boto3

        self.name = name
        self.client = boto3.client("s3")
        self.client.create_bucket(Bucket=name)

    def url(self, prefix: str = "") -> str:
        """s3://BUCKET/PREFIX/ (the folder URL a Remote opens)."""
        return f"s3://{self.name}/" + (prefix.strip("/") + "/" if prefix.strip("/") else "")

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_folder(self, folder: Path, prefix: str = "") -> str:
        """Every file under `folder` to PREFIX/<relative path>; returns the prefix's URL."""
        folder = Path(folder)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), path.relative_to(folder).as_posix()) if part)
            self.client.upload_file(str(path), self.name, key)
        return self.url(prefix)
