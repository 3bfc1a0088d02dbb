"""Real object-store and HTTP servers on 127.0.0.1 for tests, started and stopped by the tests themselves, and a
fault-injecting reverse proxy to put in front of any of them.

- MotoS3Server: moto's standalone S3 API server (a `python -m moto.server` child process).
- NginxServer: Debian's nginx in the foreground from a temp prefix, serving a folder with Range support and a JSON
  access log (one line per request: request line, Range header, status, body bytes sent).
- GcsEmulator: gcp-storage-emulator (pure Python) in memory, read through gcsfs.core.GCSFileSystem.
- FaultProxy + FaultPlan: a threaded HTTP/1.1 reverse proxy that logs every request and, on a deterministic plan,
  answers the Nth object GET with a 503 or cuts its body after K bytes.

Fixtures (import them into a test module: `from servers import s3_server, fault_proxy, ...`; nothing lives in
conftest.py): s3_server, http_server, gcs_server (session-scoped, servers only, no data), fault_proxy (a factory,
function-scoped), sample_shards (a session folder of small deterministic .tar shards + manifest.json).

Traffic stays on 127.0.0.1, and every wait here is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
S3_KEY = S3_SECRET = "vlora-testing"  # moto accepts any credentials; s3fs/botocore just need some to sign with
S3_REGION = "us-east-1"  # the one region where CreateBucket needs no LocationConstraint
GCS_PROJECT = "vlora-test"
START_TIMEOUT_S = 30.0  # generous: a loaded 2-core CI box imports moto in ~1-3 s

# ---------------------------------------------------------------------------------------------------------------
# missing dependencies: skip locally, fail in CI


def require(what: str, reason: str):
    """Make sure `what` (an importable top-level module, or else a binary on PATH or in /usr/sbin) exists, and return
    its module spec or binary path. If it does not, skip the test with a one-line reason, or fail it when
    VLORA_REQUIRE_SERVERS=1 (CI sets it, so a missing install step cannot hide behind skips)."""
    spec = importlib.util.find_spec(what) if what.isidentifier() else None
    if spec is not None:
        return spec
    # nginx lives in /usr/sbin, which is not on a non-root user's PATH
    path = shutil.which(what, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path:
        return path
    message = f"{what} is missing: {reason}"
    if os.environ.get("VLORA_REQUIRE_SERVERS") == "1":
        pytest.fail(message + " (VLORA_REQUIRE_SERVERS=1)", pytrace=False)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------------------
# processes and ports


def free_port() -> int:
    """A port that was free a moment ago (the server binds it later; _spawn retries if someone took it meanwhile)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> float:
    """Poll until something accepts on HOST:port; return the seconds waited. Raises if proc exits first or on
    timeout (polls every 20 ms, so at most timeout/0.02 attempts)."""
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return time.monotonic() - t0
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout:.0f}s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM the process group (nginx's workers, moto's threads), then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _spawn(make_cmd, log_path: Path, env: dict | None = None, attempts: int = 3) -> tuple[subprocess.Popen, int]:
    """Start make_cmd(port) in its own process group, its output to log_path (a pipe nobody reads would fill up and
    block the server), and wait for the port. A port taken between free_port() and bind() makes the server exit
    early: then try another port, at most `attempts` times."""
    last = None
    for _ in range(attempts):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(make_cmd(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        try:
            wait_port(port, proc=proc)
            return proc, port
        except (RuntimeError, TimeoutError) as e:
            stop_process(proc)
            last = e
    raise RuntimeError(f"{last}; log tail:\n{_tail(log_path)}")


# ---------------------------------------------------------------------------------------------------------------
# S3: moto's standalone server


class _ChildServer:
    """A server run as a child process on HOST: its temp folder (log, state), process and port."""

    def __init__(self, prefix: str):
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc = None
        self.port = None
        self.start_s = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


class MotoS3Server(_ChildServer):
    """moto's S3 API server as a child process (not ThreadedMotoServer: importing moto into the test process would
    register its botocore hooks there, next to the code under test, and share the GIL with the proxy threads)."""

    def __init__(self, verify_signatures: bool = False):
        super().__init__("vlora-moto-")
        self.verify_signatures = verify_signatures
        self.key, self.secret = S3_KEY, S3_SECRET

    def start(self) -> "MotoS3Server":
        t0 = time.monotonic()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION=S3_REGION)
        if self.verify_signatures:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # moto checks SigV4 (and IAM) after the 3 calls of _make_user
        self.proc, self.port = _spawn(lambda p: [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(p)],
                                      self.tmp / "moto.log", env=env)
        if self.verify_signatures:
            self._make_user()
        self.start_s = time.monotonic() - t0
        return self

    def _make_user(self) -> None:
        """By default moto checks no signature at all; with verify_signatures, requests must be signed with the
        access key made here (an IAM user allowed everything), so a proxy that alters a signed header is caught."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                           aws_secret_access_key=S3_SECRET, region_name=S3_REGION)
        iam.create_user(UserName="vlora")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="vlora", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="vlora")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def boto3_client(self, endpoint: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=secret or self.secret, region_name=S3_REGION)

    def upload_dir(self, local: Path | str, bucket: str, prefix: str = "") -> list[str]:
        """Create `bucket` (if needed) and put every file under `local` at `prefix/relative/path`; return the keys."""
        client = self.boto3_client()
        try:
            client.create_bucket(Bucket=bucket)  # bucket names: 3-63 chars, lowercase, or InvalidBucketName
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        keys = []
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = "/".join(x for x in (prefix.strip("/"), path.relative_to(local).as_posix()) if x)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
        return keys

    def storage_options(self, endpoint: str | None = None, retries: bool = False) -> dict:
        """fsspec/s3fs kwargs that reach this server, or `endpoint` (a FaultProxy's url in front of it).
        retries=False turns off botocore's retries (it retries a 503 itself: 3 tries in standard mode); s3fs's own
        loop (S3FileSystem.retries, a class attribute, 5: a cut body is retried there) is no kwarg: see filesystem()."""
        opts = {"key": self.key, "secret": self.secret, "skip_instance_cache": True, "use_listings_cache": False,
                "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": S3_REGION}}
        if not retries:
            opts["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
        return opts

    def filesystem(self, endpoint: str | None = None, retries: bool = False):
        """An s3fs.S3FileSystem on this server or `endpoint`; retries=False: one attempt per call, no retry anywhere,
        so each fault reaches the caller."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(endpoint, retries))
        if not retries:
            fs.retries = 1  # s3fs's _error_wrapper: attempts per call (class default 5, 0.1 s * 1.7**i backoff)
        return fs

    def env(self, endpoint: str | None = None) -> dict:
        """Environment under which a plain fsspec.filesystem('s3') reaches this server (botocore reads
        AWS_ENDPOINT_URL; s3fs itself does not need to)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": S3_REGION}


# ---------------------------------------------------------------------------------------------------------------
# HTTP: nginx


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
  default_type application/octet-stream;
  client_body_temp_path {tmp}/t/body;
  proxy_temp_path {tmp}/t/proxy;
  fastcgi_temp_path {tmp}/t/fastcgi;
  uwsgi_temp_path {tmp}/t/uwsgi;
  scgi_temp_path {tmp}/t/scgi;
  log_format vlora escape=json '{{"request":"$request","method":"$request_method","uri":"$uri","args":"$args",'
    '"range":"$http_range","status":$status,"bytes":$body_bytes_sent,"connection":$connection,'
    '"connection_requests":$connection_requests}}';
  access_log {tmp}/access.log vlora;
  server {{
    listen {host}:{port};
    root {root};
    autoindex on;
    # "/dir" -> 301 "Location: /dir/", relative: an absolute one would name nginx's own port and send clients
    # around a FaultProxy in front of it
    absolute_redirect off;
  }}
}}
"""


class NginxServer:
    """nginx serving `root` (default: an empty temp folder, see .root) with byte ranges (nginx's static module
    answers `Range: bytes=a-b` with 206) and directory listings (autoindex, which fsspec's HTTP ls parses)."""

    def __init__(self, root: Path | str | None = None, binary: str = "nginx"):
        self.tmp = Path(tempfile.mkdtemp(prefix="vlora-nginx-"))
        self.root = Path(root) if root else self.tmp / "www"
        self.root.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.proc = None
        self.port = None
        self.start_s = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _write_conf(self, port: int) -> Path:
        (self.tmp / "t").mkdir(exist_ok=True)
        # as root, nginx's workers would switch to user nobody, who may not read a test's temp folder
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, tmp=self.tmp, host=HOST, port=port, root=self.root.resolve()))
        return conf

    def start(self) -> "NginxServer":
        t0 = time.monotonic()

        def cmd(port):
            # -e: the startup error log too, or nginx tries /var/log/nginx/error.log before reading the conf
            return [self.binary, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c",
                    str(self._write_conf(port))]

        self.proc, self.port = _spawn(cmd, self.tmp / "stderr.log")
        self.start_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add_dir(self, local: Path | str, prefix: str) -> str:
        """Copy a folder under root/prefix; return its URL."""
        dest = self.root / prefix.strip("/")
        shutil.copytree(local, dest, dirs_exist_ok=True)
        return f"{self.url}/{prefix.strip('/')}"

    def access_log(self) -> list[dict]:
        """The access log so far, one dict per request: request, method, uri, args, range ('' when none), status,
        bytes (body bytes sent), connection, connection_requests."""
        path = self.tmp / "access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_log(self, n: int, timeout: float = 5.0) -> list[dict]:
        """The access log once it has at least n lines: nginx writes a line when it finalizes the request, which can
        be a moment after the client already has the last byte. Bounded: polls every 10 ms for `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.access_log()
            if len(entries) >= n or time.monotonic() > deadline:
                return entries
            time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# GCS: gcp-storage-emulator


class GcsEmulator(_ChildServer):
    """gcp-storage-emulator in memory as a child process. Read it with gcsfs.core.GCSFileSystem (see .filesystem()):
    the default gcsfs.GCSFileSystem (ExtendedGcsFileSystem, gcsfs>=2026) first asks the gRPC storage-control API for
    the bucket type, which the emulator lacks: 60 s timeouts per bucket before it falls back."""

    def __init__(self):
        super().__init__("vlora-gcs-")

    def start(self) -> "GcsEmulator":
        t0 = time.monotonic()
        exe = Path(sys.executable).parent / "gcp-storage-emulator"
        exe = str(exe) if exe.exists() else "gcp-storage-emulator"
        self.proc, self.port = _spawn(lambda p: [exe, "start", "-H", HOST, "--port", str(p), "-q", "--in-memory"],
                                      self.tmp / "gcs.log")
        self.start_s = time.monotonic() - t0
        return self

    def _post(self, url: str, data: bytes, content_type: str) -> int:
        req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def upload_dir(self, local: Path | str, bucket: str, prefix: str = "") -> list[str]:
        """Create `bucket` (409 if it exists is fine) and upload every file under `local` at prefix/relative/path
        with the JSON API's simple media upload; return the object names."""
        status = self._post(f"{self.endpoint}/storage/v1/b?project={GCS_PROJECT}",
                            json.dumps({"name": bucket}).encode(), "application/json")
        assert status in (200, 409), f"create bucket {bucket}: HTTP {status}"
        names = []
        # Empty files are left out: the emulator's media upload fails on a body of 0 bytes (an empty rejects.jsonl).
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file() and p.stat().st_size):
            name = "/".join(x for x in (prefix.strip("/"), path.relative_to(local).as_posix()) if x)
            url = (f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                   f"{urllib.parse.quote(name, safe='')}")
            status = self._post(url, path.read_bytes(), "application/octet-stream")
            assert status == 200, f"upload {name}: HTTP {status}"
            names.append(name)
        return names

    def storage_options(self, endpoint: str | None = None) -> dict:
        """gcsfs kwargs for this emulator or a proxy in front of it. gcsfs retries 5xx and payload errors itself (6
        tries, 1-2 s then doubling backoff; fixed at class definition), so a fault plan sees its retries."""
        return {"endpoint_url": endpoint or self.endpoint, "token": "anon", "project": GCS_PROJECT,
                "skip_instance_cache": True}

    def filesystem(self, endpoint: str | None = None):
        import gcsfs.core

        return gcsfs.core.GCSFileSystem(**self.storage_options(endpoint))


# ---------------------------------------------------------------------------------------------------------------
# FaultProxy: a logging, fault-injecting reverse proxy


# hop-by-hop headers (RFC 9110 7.6.1) are per connection and never forwarded; Expect: 100-continue is answered by
# the proxy's own handler, and SigV4 does not sign it
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "expect"}
_CHUNK = 64 * 1024


def is_object_get(method: str, path: str, query: str) -> bool:
    """Whether a request reads an object's bytes (what a FaultPlan may fault), not a listing, HEAD or metadata:
    - GCS JSON API: /storage/v1/... only with alt=media; /download/storage/v1/... always.
    - S3 path-style (/bucket/key) and plain HTTP (/dir/file): a path that does not end in '/', and not a bucket-level
      S3 call (a single path segment with a query: list-type=2, location, ...)."""
    if method != "GET":
        return False
    if path.startswith("/download/storage/v1/"):
        return True
    if path.startswith("/storage/v1/"):
        return "alt=media" in query.split("&")
    segments = [s for s in path.split("/") if s]
    if not segments or path.endswith("/"):
        return False
    return not (len(segments) == 1 and query)


@dataclass
class FaultPlan:
    """Which object GETs (1-based, counted over requests that is_object_get() accepts and whose path contains
    `match`, if given) get which fault:
    - status_503: answered `error_status` (503) by the proxy itself, never reaching upstream;
    - cut: forwarded, but the connection is closed after `cut_after` bytes of body, while the headers still promise
      the full Content-Length (the client sees a truncated body / a disconnect)."""

    status_503: list[int] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)
    cut_after: int = 0
    match: str | None = None
    error_status: int = 503

    def fault_for(self, n: int) -> str | None:
        if n in self.status_503:
            return "status_503"
        if n in self.cut:
            return "cut"
        return None


def parse_range(header: str | None) -> tuple[int, int | None] | None:
    """'bytes=a-b' -> (a, b + 1), 'bytes=a-' -> (a, None), 'bytes=-n' -> (-n, None); None for no header."""
    if not header:
        return None
    spec = header.split("=", 1)[1].split(",")[0].strip()
    first, last = spec.split("-", 1)
    if first == "":
        return (-int(last), None)
    return (int(first), int(last) + 1 if last else None)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: requests are handled in order on it (keep-alive), each forwarded on this handler's own
    upstream connection, which is reused until upstream or a fault closes it."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive client connection ends after this, so no thread waits forever

    def setup(self):
        super().setup()
        self.proxy = self.server.fault_proxy
        self.conn_id = self.proxy._track(self.connection)
        self.upstream = None

    def finish(self):
        try:
            super().finish()
        finally:
            self._close_upstream()
            self.proxy._untrack(self.connection)

    def log_message(self, format, *args):  # the proxy's own log is FaultProxy.log
        pass

    def _close_upstream(self):
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _read_body(self) -> bytes | None:
        """The request body, de-chunked (it is forwarded with a Content-Length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = io.BytesIO()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self, body: bytes | None) -> http.client.HTTPResponse:
        """Send the request upstream with its headers (Host, Authorization, Range, x-amz-* ...) unchanged, so SigV4
        signatures still verify; retry once on a fresh connection if a reused one turns out closed."""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        for attempt in (0, 1):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port,
                                                           timeout=60)
            reused = self.upstream.sock is not None
            try:
                self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    self.upstream.putheader(k, v)
                self.upstream.endheaders(body)
                return self.upstream.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine):
                self._close_upstream()
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_own(self, entry: dict, status: int, message: str) -> None:
        """A response made here (an injected fault, or 502 when upstream is unreachable); keeps the connection."""
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                f"<Message>{message}</Message></Error>").encode()
        entry["status"] = status
        entry["bytes"] = len(body)
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        if self.close_connection:
            headers.append(("Connection", "close"))
        self._send_head(status, http.HTTPStatus(status).phrase, headers)
        self.wfile.write(body)

    def _relay(self, resp: http.client.HTTPResponse, entry: dict, cut: bool) -> None:
        """Stream the upstream response back. Without a Content-Length upstream (chunked or close-delimited), relay
        it chunked. A cut sends exactly cut_after body bytes, then closes both connections."""
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        chunked = not no_body and resp.getheader("Content-Length") is None
        if cut:
            self.close_connection = True
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
        headers += [("Transfer-Encoding", "chunked")] if chunked else []
        headers += [("Connection", "close")] if self.close_connection else []
        entry["status"] = resp.status  # logged before sending: a client that has the bytes finds them logged
        self._send_head(resp.status, resp.reason, headers)
        limit = self.proxy.plan.cut_after if cut else None
        complete = False
        try:
            if no_body:
                resp.read()  # b"", but marks the response done so the upstream connection can be reused
            while not no_body:
                want = _CHUNK if limit is None else min(_CHUNK, limit - entry["bytes"])
                data = resp.read(want) if want > 0 else b""
                if not data:
                    break
                entry["bytes"] += len(data)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked and not cut:
                self.wfile.write(b"0\r\n\r\n")
            complete = not cut
        finally:
            if not complete or resp.will_close or not resp.isclosed():
                self._close_upstream()  # unread upstream body: that connection cannot be reused
            if not complete:
                self.close_connection = True

    def _handle(self):
        entry = None
        try:
            body = self._read_body()
            url = urllib.parse.urlsplit(self.path)
            entry, fault = self.proxy._begin(self.command, url.path, url.query, self.headers.get("Range"),
                                             self.conn_id)
            if fault == "status_503":
                self._send_own(entry, self.proxy.plan.error_status, "FaultProxy injected this error")
                return
            try:
                resp = self._forward(body)
            except OSError as e:
                entry["error"] = repr(e)
                self._send_own(entry, 502, f"FaultProxy: upstream unreachable: {e!r}")
                return
            self._relay(resp, entry, cut=fault == "cut")
        except OSError as e:  # the client went away mid-response
            if entry is not None:
                entry["error"] = entry["error"] or repr(e)
            self.close_connection = True
        finally:
            if entry is not None:
                entry["done"] = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # FaultProxy.stop() closes client connections itself, so nothing joins a blocked thread
    allow_reuse_address = True


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy on 127.0.0.1 in front of `upstream` (a base URL such as
    MotoS3Server.endpoint, NginxServer.url or GcsEmulator.endpoint). Point the client at .url instead.

    .log is every request so far (a list of dict copies, in arrival order): n, conn (client connection id), method,
    path, query, range (the Range header or None), match_n (its number among the plan's object GETs, else None),
    fault (None, 'status_503' or 'cut'), status (sent to the client), bytes (body bytes relayed), error, done.
    An entry's status/bytes are updated before the bytes are sent, so a client holding them finds them logged."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, classify=is_object_get):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.plan = plan or FaultPlan()
        self.classify = classify
        self._lock = threading.Lock()
        self._log: list[dict] = []
        self._matched = 0
        self._conns: dict[socket.socket, int] = {}
        self._conn_seq = 0
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "FaultProxy":
        self._server = _ProxyServer((HOST, 0), _ProxyHandler)
        self._server.fault_proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="FaultProxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, then shut down open client connections, so handler threads blocked on an idle keep-alive
        connection return (bounded: joins nothing but the accept loop, for at most 5 s)."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_plan(self, plan: FaultPlan) -> None:
        """A new plan, counted from 1 again (the log is kept)."""
        with self._lock:
            self.plan = plan
            self._matched = 0

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    @property
    def log(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self._log]

    def object_gets(self, contains: str | None = None) -> list[dict]:
        """Log entries of the plan's matching object GETs (those counted for faults), optionally by path."""
        return [e for e in self.log if e["match_n"] is not None and (contains is None or contains in e["path"])]

    def requested_ranges(self, contains: str) -> list[tuple[int, int | None]]:
        """(start, end) of every GET whose path contains `contains`, end exclusive (None: to the end of the object);
        a GET without Range is (0, None). E.g. min(s for s, _ in ...) is the lowest byte ever asked for."""
        return [parse_range(e["range"]) or (0, None) for e in self.log
                if e["method"] == "GET" and contains in e["path"]]

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait (polling every 10 ms, at most `timeout` s) until every logged request has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(e["done"] for e in self.log):
                return True
            time.sleep(0.01)
        return False

    # called from handler threads

    def _track(self, sock) -> int:
        with self._lock:
            self._conn_seq += 1
            self._conns[sock] = self._conn_seq
            return self._conn_seq

    def _untrack(self, sock) -> None:
        with self._lock:
            self._conns.pop(sock, None)

    def _begin(self, method, path, query, range_header, conn_id) -> tuple[dict, str | None]:
        """Log a request as it arrives and decide its fault, under the lock: the numbering is arrival order."""
        with self._lock:
            entry = {"n": len(self._log) + 1, "conn": conn_id, "method": method, "path": path, "query": query,
                     "range": range_header, "match_n": None, "fault": None, "status": None, "bytes": 0,
                     "error": None, "done": False}
            plan = self.plan
            if self.classify(method, path, query) and (plan.match is None or plan.match in path):
                self._matched += 1
                entry["match_n"] = self._matched
                entry["fault"] = plan.fault_for(self._matched)
            self._log.append(entry)
            return entry, entry["fault"]


# ---------------------------------------------------------------------------------------------------------------
# sample data


def make_shard_folder(folder: Path | str, n_shards: int = 2, samples: int = 6, payload: int = 200_000,
                      seed: int = 0) -> Path:
    """Small deterministic WebDataset-style shards: shard-00000N.tar of `samples` samples (KEY.bin random bytes of
    `payload` size, KEY.json), and a manifest.json naming each shard with its size and sha256. Not vlora's manifest
    format: a stand-in for transport tests (loader tests should use `vlora pack` output)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shards = []
    for i in range(n_shards):
        path = folder / f"shard-{i:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(samples):
                key = f"{i:06d}-{j:04d}"
                for ext, data in (("bin", rng.randbytes(payload)), ("json", json.dumps({"i": i, "j": j}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        data = path.read_bytes()
        shards.append({"name": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "samples": samples})
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}, indent=1))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """A folder of 2 small .tar shards (~1.2 MB each) and manifest.json, the same bytes every session."""
    return make_shard_folder(tmp_path_factory.mktemp("sample") / "shards")


def _running(server):
    """A fixture's body: the started server, stopped however the tests using it end."""
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (empty: call .upload_dir(); use a bucket name of your own, the server is session-wide)."""
    for module, why in (("moto", "pip install 'moto[server]'"), ("boto3", "pip install boto3"),
                        ("s3fs", "pip install s3fs")):
        require(module, f"the S3 test server needs it ({why})")
    yield from _running(MotoS3Server())


@pytest.fixture(scope="session")
def http_server():
    """nginx serving .root (empty: write files there or call .add_dir(); .access_log() is session-wide too)."""
    binary = require("nginx", "the HTTP test server needs it (apt-get install nginx)")
    require("aiohttp", "fsspec's HTTP filesystem needs it (pip install aiohttp)")
    yield from _running(NginxServer(binary=binary))


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator in memory (empty: call .upload_dir(); read with .filesystem(endpoint))."""
    require("gcp_storage_emulator", "the GCS test server needs it (pip install gcp-storage-emulator)")
    require("gcsfs", "gs:// reads need it (pip install gcsfs)")
    yield from _running(GcsEmulator())


@pytest.fixture
def fault_proxy():
    """A factory: fault_proxy(upstream_url, plan=None) -> a started FaultProxy, stopped after the test."""
    proxies = []

    def make(upstream: str, plan: FaultPlan | None = None, classify=is_object_get) -> FaultProxy:
        proxies.append(FaultProxy(upstream, plan, classify).start())
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()
