"""Shard folders behind URLs: `s3://bucket/prefix`, `gs://bucket/prefix`, `https://host/path`, `pipe:COMMAND`.

A remote shard is never downloaded whole before it is read. `open_shard` gives a file object that fetches the
shard CHUNK bytes at a time with byte-range requests, the next chunk in flight while the current one is read, so a
slow store does not stall the reader. It starts at any byte: a resumed stream asks for the byte where its sample
starts (the manifest lists every sample's offset) and nothing before it.

Failures. A read that fails (connection reset, 5xx, timeout) or comes back short is asked again from the first
byte not yet received, after a backoff (RetryPolicy), up to `retries` times in a row; every retry is logged with
the shard and the byte. Past that, and at once for what retrying cannot mend (no such shard, no permission, a
server that ignores byte ranges), VloraError names the shard URL and the byte. A shard whose size differs from
its manifest's (replaced in the store) is refused when opened. The client libraries' own retries are turned off
where they can be, so that every retry is one of ours, counted and bounded.

Clients: fsspec, with s3fs for s3:// (credentials, region and endpoint from the usual AWS environment and
config files, `AWS_ENDPOINT_URL` for S3-compatible stores such as MinIO or Ceph), gcsfs for gs:// and aiohttp for
http(s)://. `pipe:COMMAND` runs COMMAND with `{name}` replaced by the file's name (manifest.json,
shard-000000.tar) and reads its standard output; a pipe cannot seek, so a retry or a resume runs the command
again and skips the bytes before the position. URLs are logged without user info or query strings (which may
carry credentials).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shlex
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from vlora.errors import VloraError

log = logging.getLogger("vlora")

SCHEMES = ("s3://", "gs://", "http://", "https://")
PIPE = "pipe:"
CHUNK = 8 << 20  # bytes per range request: large enough for an object store's throughput, small enough to retry


def is_remote(location) -> bool:
    return isinstance(location, str) and (location.startswith(SCHEMES) or location.startswith(PIPE))


def join(folder: str, name: str) -> str:
    """The URL of file `name` in shard folder `folder` (for pipe:, the command with {name} filled in)."""
    if folder.startswith(PIPE):
        if "{name}" not in folder:
            raise VloraError(f"'{redact(folder)}': a pipe: folder needs {{name}} where the file name goes, e.g. "
                             "'pipe:aws s3 cp s3://bucket/prefix/{name} -'")
        return folder.replace("{name}", shlex.quote(name))
    return folder.rstrip("/") + "/" + name


def redact(url: str) -> str:
    """`url` fit for a log line: no user:password@ and no ?query (signed URLs carry their key there); in a pipe:
    command, the URLs in it likewise (the rest of a command is logged as written: keep secrets in the environment)."""
    if url.startswith(PIPE):
        return re.sub(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact(m.group(0)), url)
    if not url.startswith(SCHEMES):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed read is tried again (in a row, without a byte of progress) and how long to wait."""

    retries: int = 8
    backoff_s: float = 0.5  # the first wait; doubled at every retry in a row, at most max_backoff_s
    max_backoff_s: float = 30.0

    def wait(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return base * random.uniform(0.5, 1.0)  # jitter: readers that failed together do not retry together


class Permanent(Exception):
    """A failure that retrying cannot mend (missing, forbidden, ranges ignored)."""


def _one_line(e: BaseException) -> str:
    """`e` as one log-safe line: its type and first line, URLs in it without user info or query (the clients put the
    request's URL, a signed one included, into their messages)."""
    text = str(e).strip().splitlines()
    line = re.sub(r"https?://[^\s'\"<>]+", lambda m: redact(m.group(0)), text[0] if text else "")
    return f"{type(e).__name__}: {line}".strip().rstrip(":")


# --- clients ----------------------------------------------------------------------------------------

_filesystems: dict = {}
_lock = threading.Lock()


def _make_filesystem(protocol: str):
    """A client with its own retries off where it has a switch: every retry is then one of ours (logged, counted,
    bounded by data.retries). gcsfs retries 5xx inside (6 tries) and cannot be told otherwise."""
    import fsspec

    if protocol == "s3":
        # The endpoint (AWS_ENDPOINT_URL), credentials and region come from botocore's usual environment and files.
        fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False,
                               config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
        fs.retries = 1  # s3fs's own retry loop: a class attribute, not an argument
        return fs
    if protocol == "gs":
        # The classic client: gcsfs's default class first probes the bucket's layout over gRPC, which S3-like
        # emulators and proxies do not answer (60 s timeouts); object reads are the same.
        from gcsfs.core import GCSFileSystem

        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        return GCSFileSystem(skip_instance_cache=True, **({"endpoint_url": emulator, "token": "anon"} if emulator else {}))
    return fsspec.filesystem("http", skip_instance_cache=True)


def filesystem(url: str):
    """(fsspec filesystem, path) for an s3://, gs:// or http(s):// URL; one client per process and protocol
    (clients made before a fork are not used after it: their event loop stays in the parent)."""
    protocol = url.split("://", 1)[0]
    key = (os.getpid(), "http" if protocol == "https" else protocol)
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:
                fs = _make_filesystem(key[1])
            except ImportError as e:
                extra = {"s3": "s3fs", "gs": "gcsfs"}.get(protocol, "aiohttp")
                raise VloraError(f"reading {protocol}:// needs {extra} ({e}); pip install -e '.[remote]'") from None
            _filesystems[key] = fs
    return fs, (url if protocol in ("http", "https") else url.split("://", 1)[1])


def _status(e: BaseException) -> int | None:
    """The HTTP status behind a client exception: aiohttp's .status, botocore's response metadata."""
    status = getattr(e, "status", None)
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", status)
    return status if isinstance(status, int) else None


def _classify(e: BaseException) -> BaseException:
    """Permanent(...) for what a retry cannot mend (missing, forbidden, a bad request), else `e` itself."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return Permanent(_one_line(e))
    status = _status(e)
    if status in (400, 401, 403, 404, 405, 416):
        return Permanent(f"{_one_line(e)} (HTTP {status})")
    return e


def _fetch_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `url` in one request (what the server sent; the caller checks the length)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except Exception as e:  # noqa: BLE001 - the client's exception types differ by store; sorted by _classify
        raise _classify(e) from None


def remote_size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return int(fs.size(path))
    except Exception as e:  # noqa: BLE001
        raise _classify(e) from None


class Closed(Exception):
    """The file a read was for was closed meanwhile: the read is abandoned."""


def _after_failure(what: str, url: str, offset: int, error: str, failures: int, policy: RetryPolicy,
                   stop: threading.Event | None = None) -> None:
    """The `failures`-th failure in a row of `what` at `offset`: log it and wait, or stop the run past the limit.
    A set `stop` (the file was closed) ends the wait and the read at once."""
    if failures > policy.retries:
        raise VloraError(f"{redact(url)}: {what} at byte {offset} failed {failures} times in a row, last: {error}; "
                         "the run stops here (fix the store or raise data.retries, then resume)")
    if stop is not None and stop.is_set():
        raise Closed()
    delay = policy.wait(failures - 1)
    log.warning("%s: %s at byte %d failed (%s); retry %d of %d in %.1f s", redact(url), what, offset, error,
                failures, policy.retries, delay)
    if stop is not None:
        if stop.wait(delay):
            raise Closed()
    else:
        time.sleep(delay)


def with_retries(what: str, url: str, offset: int, policy: RetryPolicy, call):
    """call() until it returns; each failure is logged with `url` and `offset` and retried after a backoff."""
    failures = 0
    while True:
        try:
            return call()
        except Permanent as e:
            raise VloraError(f"{redact(url)}: {what} at byte {offset} failed: {e}") from None
        except VloraError:
            raise
        except Exception as e:  # noqa: BLE001 - anything else a network call raises is worth another try
            sorted_out = _classify(e)
            if isinstance(sorted_out, Permanent):
                raise VloraError(f"{redact(url)}: {what} at byte {offset} failed: {sorted_out}") from None
            failures += 1
            _after_failure(what, url, offset, _one_line(e), failures, policy)


class ShortRead(Exception):
    pass


def read_range(url: str, start: int, end: int, policy: RetryPolicy, stop: threading.Event | None = None) -> bytes:
    """Bytes [start, end) of `url`. A failed request is asked again from the first byte not yet received; a body
    cut short keeps what it brought (and, having brought something, starts the count of failures in a row afresh;
    a range that fails more than 4 x policy.retries times in all stops all the same)."""
    parts, pos, failures, total = [], start, 0, 0
    while pos < end:
        if total > 4 * policy.retries:
            failures = policy.retries  # the next failure is past the limit
        try:
            data = _fetch_range(url, pos, end)
        except Permanent as e:
            raise VloraError(f"{redact(url)}: read at byte {pos} failed: {e}") from None
        except VloraError:
            raise
        except Exception as e:  # noqa: BLE001 - the client's exception types differ by store
            failures, total = failures + 1, total + 1
            _after_failure("read", url, pos, _one_line(e), failures, policy, stop)
            continue
        if len(data) > end - pos:
            raise VloraError(f"{redact(url)}: read at byte {pos} failed: asked for {end - pos} bytes, got {len(data)}: "
                             "the server ignores byte ranges")
        if data:
            parts.append(data)
            pos, failures = pos + len(data), 0
        if pos < end:
            failures, total = failures + 1, total + 1
            _after_failure("read", url, pos, f"the body ended after {len(data)} of {end - pos + len(data)} bytes",
                           failures, policy, stop)
    return b"".join(parts)


def read_bytes(url: str, policy: RetryPolicy = RetryPolicy()) -> bytes:
    """A whole (small) remote file, e.g. a manifest."""
    if url.startswith(PIPE):
        f = PipeFile(url, None, 0, policy)
        try:
            return f.read()
        finally:
            f.close()
    size = with_retries("size", url, 0, policy, lambda: remote_size(url))
    return read_range(url, 0, size, policy) if size else b""


# --- shard files -----------------------------------------------------------------------------------


class RangeFile(io.RawIOBase):
    """A remote shard as a read-only stream from byte `start`: CHUNK-byte range reads, the next one in flight."""

    def __init__(self, url: str, size: int, start: int, policy: RetryPolicy, chunk: int = CHUNK):
        super().__init__()
        self.url, self.size, self.pos, self.policy, self.chunk = url, size, start, policy, chunk
        actual = with_retries("size", url, 0, policy, lambda: remote_size(url))
        if actual != size:
            raise VloraError(f"{redact(url)} has {actual} bytes, its manifest.json says {size}: the shard was replaced "
                             "in the store; restore it or repack the folder")
        self.buf, self.buf_pos = b"", 0
        self.next_start = start
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlora-shard")
        self.stop = threading.Event()  # set by close(): a read in flight gives up instead of retrying on
        self.ahead: Future | None = self._ask()

    def _ask(self) -> Future | None:
        if self.next_start >= self.size:
            return None
        start, end = self.next_start, min(self.size, self.next_start + self.chunk)
        self.next_start = end
        return self.pool.submit(read_range, self.url, start, end, self.policy, self.stop)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.buf_pos == len(self.buf):
            if self.ahead is None:
                return 0
            self.buf, self.buf_pos = self.ahead.result(), 0
            self.ahead = self._ask()
        n = min(len(b), len(self.buf) - self.buf_pos)
        b[:n] = self.buf[self.buf_pos:self.buf_pos + n]
        self.buf_pos += n
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.stop.set()
            if self.ahead is not None:
                self.ahead.cancel()
            self.pool.shutdown(wait=False)
        super().close()


class PipeFile(io.RawIOBase):
    """pipe:COMMAND's standard output from byte `start`; a failed or short run is run again and skipped forward."""

    def __init__(self, url: str, size: int | None, start: int, policy: RetryPolicy):
        super().__init__()
        self.url, self.command, self.size, self.pos, self.policy = url, url[len(PIPE):], size, start, policy
        self.proc: subprocess.Popen | None = None
        with_retries("read", url, start, policy, self._start)

    def _start(self) -> None:
        self._stop()
        # stderr to a file, not a pipe: a pipe nobody reads fills (curl's progress meter) and the command blocks
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=self.err)
        skip = self.pos
        while skip:  # a pipe cannot seek: read and drop what comes before the position
            got = self.proc.stdout.read(min(skip, 1 << 20))
            if not got:
                error = self._failed()
                self._stop()
                raise error
            skip -= len(got)

    def _failed(self) -> Exception:
        code = self.proc.wait()
        self.err.seek(0)
        err = (self.err.read()[-4096:].decode(errors="replace").strip().splitlines() or [""])[-1]
        ended = "ended" if code == 0 else f"exited with status {code}"
        return ShortRead(f"the command {ended} at byte {self.pos}" + (f" ({redact(err)})" if err else ""))

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.err.close()
            self.proc = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            if self.proc is not None and self.proc.stdout.read(1):
                raise VloraError(f"{redact(self.url)}: the command writes more than the {self.size} bytes its "
                                 "manifest.json lists: the shard was replaced in the store; restore it or repack")
            return 0

        view = memoryview(b)[: self.size - self.pos] if self.size is not None else b  # never past the shard's end

        def once() -> int:
            if self.proc is None:
                self._start()
            n = self.proc.stdout.readinto(view)
            if n:
                return n
            if self.size is None and self.proc.wait() == 0:
                return 0  # the whole output, its size unknown (a manifest)
            error = self._failed()
            self._stop()
            raise error

        n = with_retries("read", self.url, self.pos, self.policy, once)
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop()
        super().close()


def open_shard(url: str, size: int, start: int, policy: RetryPolicy) -> io.BufferedReader:
    """A remote shard of `size` bytes (its manifest's), readable from byte `start`."""
    raw = PipeFile(url, size, start, policy) if url.startswith(PIPE) else RangeFile(url, size, start, policy)
    return io.BufferedReader(raw, buffer_size=1 << 16)


# --- writing: `vlora pack --out s3://... | gs://...` ---------------------------------------------------------


class Uploader:
    """Puts a shard folder into an s3:// or gs:// prefix: each shard as soon as it is finished, manifest.json
    last, so the prefix is a shard set only once it is complete. An earlier set there stays whole until the first
    new shard is ready (a pack that fails on its input leaves it untouched), then stops being one (its manifest
    goes before any of its shards is replaced); its files that the new set does not have go at the end."""

    def __init__(self, url: str, policy: RetryPolicy = RetryPolicy()):
        if not url.startswith(("s3://", "gs://")):
            raise VloraError(f"vlora pack --out {redact(url)}: an object store folder (s3:// or gs://) or a local one; "
                             "for other stores pack locally and copy the folder, manifest.json last")
        self.url, self.policy = url.rstrip("/"), policy
        self.fs, self.path = filesystem(self.url)
        names = with_retries("listing", self.url, 0, policy, self._names)
        foreign = sorted(n for n in names if not re.fullmatch(r"manifest\.json|rejects\.jsonl|shard-\d+\.tar", n))
        if foreign:  # a set's own files, or what a pack that failed half-way left, may be replaced; nothing else
            raise VloraError(f"{redact(self.url)}: holds {len(foreign)} file(s) that no shard folder has (e.g. "
                             f"{foreign[0]}); choose another prefix or empty it")
        self.old = names
        self.put_names: list[str] = []

    def _names(self) -> set[str]:
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        except FileNotFoundError:
            return set()

    def put(self, local) -> None:
        """Upload one finished file of the folder (retried as reads are). The first one takes the old set's
        manifest away first: from then on the prefix is no shard set until the new manifest is there."""
        if "manifest.json" in self.old and not self.put_names:
            with_retries("delete", f"{self.url}/manifest.json", 0, self.policy,
                         lambda: self.fs.rm_file(f"{self.path}/manifest.json"))
        name = os.path.basename(str(local))
        target = f"{self.url}/{name}"
        with_retries("upload", target, 0, self.policy, lambda: self.fs.put_file(str(local), f"{self.path}/{name}"))
        self.put_names.append(name)

    def finish(self, folder) -> None:
        """The rest of the finished local `folder` (rejects.jsonl), then its manifest.json; then the old set's
        leftover files."""
        for entry in sorted(os.listdir(folder)):
            if entry != "manifest.json" and entry not in self.put_names and os.path.isfile(os.path.join(folder, entry)):
                self.put(os.path.join(folder, entry))
        self.put(os.path.join(folder, "manifest.json"))
        for name in sorted(self.old - set(self.put_names)):
            with_retries("delete", f"{self.url}/{name}", 0, self.policy,
                         lambda name=name: self.fs.rm_file(f"{self.path}/{name}"))
