"""An S3 server on loopback for tests and benches: moto's server behind a small proxy that logs
every request and, on demand, answers some with faults (403 AccessDenied, 503 SlowDown) or adds
latency (real S3 answers a GET in tens of milliseconds; moto on loopback in one).

    with FakeS3() as s3:                      # moto on 127.0.0.1, the proxy on 127.0.0.5
        os.environ.update(s3.env)             # AWS_ENDPOINT_URL points at the proxy
        s3.faults([{"path": r"/icm/images/a\\.png", "status": 403}])   # until cleared
        s3.faults([{"path": r"\\.png$", "status": 503, "times": 2}])   # the first 2 matching requests
        s3.requests()                         # [(method, path?query), ...] since the last reset_log()

moto has no fault injection of its own for S3 and logs requests only to its console; a proxy
sees exactly what a client sends, whichever client (pyarrow's C++ SDK, in a Ray worker or a
driver subprocess). Run as a script, this module is the proxy: ``--listen HOST:PORT --upstream URL``.
Control requests go to ``/_fake/...`` (no bucket name starts with ``_``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ERROR_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class _State:
    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.log: list[tuple[str, str]] = []
        self.latency_s = 0.0
        self.local = threading.local()

    def match(self, method: str, path: str) -> dict | None:
        with self.lock:
            for rule in self.rules:
                if rule.get("method", "*") not in ("*", method) or not re.search(rule["path"], path.split("?")[0]):
                    continue
                if rule.get("times") is not None:
                    if rule["times"] <= 0:
                        continue
                    rule["times"] -= 1
                return rule
        return None

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.upstream, timeout=60)
        return conn


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, *args):   # quiet: the log is kept in memory, for /_fake/requests
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, length: str | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", length or str(len(body)))   # a HEAD's is the object's size
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _control(self, body: bytes):
        state, what = self.state, self.path[len("/_fake/"):]
        with state.lock:
            if what == "requests":
                return self._reply(200, json.dumps(state.log).encode())
            if what == "reset":
                state.log.clear()
            elif what == "faults":
                state.rules = json.loads(body or b"[]")
            elif what == "latency":
                state.latency_s = float(json.loads(body))
            else:
                return self._reply(404)
        self._reply(200)

    def _handle(self):
        body = self._body()
        if self.path.startswith("/_fake/"):
            return self._control(body)
        state = self.state
        with state.lock:
            state.log.append((self.command, self.path))
        if state.latency_s:
            time.sleep(state.latency_s)
        rule = state.match(self.command, self.path)
        if rule is not None:
            status = int(rule["status"])
            code = rule.get("code") or ERROR_CODES.get(status, "InternalError")
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                   f"<Message>injected by tests/s3_fake.py</Message></Error>").encode()
            return self._reply(status, xml, {"Content-Type": "application/xml"})
        # the body is read already: no 100-continue upstream; one Content-Length
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect", "content-length"}}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):   # a kept-alive upstream connection may have been closed
            conn = state.connection()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                state.local.conn = None
                if attempt:
                    raise
        out = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        self._reply(response.status, data, out, response.getheader("Content-Length") if self.command == "HEAD" else None)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def serve(listen: str, upstream: str) -> None:
    host, port = listen.rsplit(":", 1)
    handler = type("Handler", (_Handler,), {"state": _State(upstream)})
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    server.serve_forever()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for(host: str, port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start on {host}:{port}")
            time.sleep(0.2)


class FakeS3:
    """moto's S3 server plus the proxy, as subprocesses; ``env`` points S3 clients at the proxy."""

    def __init__(self, host: str = "127.0.0.5", buckets: tuple[str, ...] = ("icm",)):
        self.host, self.buckets = host, buckets
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "FakeS3":
        moto_port, proxy_port = _free_port("127.0.0.1"), _free_port(self.host)
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(moto)
        proxy = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--listen",
                                  f"{self.host}:{proxy_port}", "--upstream", f"127.0.0.1:{moto_port}"])
        self.procs.append(proxy)
        _wait_for("127.0.0.1", moto_port, moto, "moto server")
        _wait_for(self.host, proxy_port, proxy, "S3 proxy")
        self.url = f"http://{self.host}:{proxy_port}"
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true"}
        self.direct_env = {**self.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}"}   # past the proxy
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=self.url, access_key="test", secret_key="test", region="us-east-1",
                               allow_bucket_creation=True)
        for bucket in self.buckets:
            fs.create_dir(bucket)
        self.reset_log()
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _post(self, what: str, payload=None) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{self.url}/_fake/{what}", data=data,
                                                           method="POST" if data is not None else "GET")) as r:
            return r.read()

    def faults(self, rules: list[dict]) -> None:
        """Answer requests matching a rule (``path`` regex on the request path, optional ``method``
        and ``times``) with ``status`` until cleared; ``faults([])`` clears them."""
        self._post("faults", rules)

    def latency(self, seconds: float) -> None:
        self._post("latency", seconds)

    def reset_log(self) -> None:
        self._post("reset", {})

    def requests(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in json.loads(self._post("requests"))]

    def keys(self, bucket: str = "icm") -> list[str]:
        """Every key in ``bucket`` as stored (a directory marker is a key ending in ``/``), listed
        from moto directly with ListObjectsV2, past the proxy and its log."""
        import xml.etree.ElementTree as ET
        from urllib.parse import quote

        moto = f"http://127.0.0.1:{self.procs[0].args[-1]}"
        keys, token = [], None
        while True:
            query = "list-type=2" + (f"&continuation-token={quote(token)}" if token else "")
            with urllib.request.urlopen(f"{moto}/{bucket}?{query}") as r:
                root = ET.fromstring(r.read())
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            keys += [k.text for k in root.iter(f"{ns}Key")]
            token = root.findtext(f"{ns}NextContinuationToken")
            if not token:
                return sorted(keys)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a logging, fault-injecting proxy in front of an S3 server")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    args = parser.parse_args()
    serve(args.listen, args.upstream)
