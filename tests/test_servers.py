"""The local test servers of tests/servers.py (moto S3, nginx, the GCS emulator) and the FaultProxy in front of them:
ranged reads return exactly the file's bytes, planned faults reach the client at the planned request numbers, and
the logs record every Range header. Each test compares exact bytes and counts."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

import servers
from servers import FaultPlan, FaultProxy, is_object_get, parse_range, require

# the fixtures, bound here so that pytest finds them in this module (assignments, so pyflakes sees them used)
s3_server, http_server, gcs_server = servers.s3_server, servers.http_server, servers.gcs_server
fault_proxy, sample_shards = servers.fault_proxy, servers.sample_shards

BUCKET = "vlora-servers-test"  # the servers are session-wide: this module's own bucket and prefix
SHARD = "shard-000000.tar"
# (start, end) byte windows, end exclusive: the first, one in the middle across a 64 KiB boundary, the last bytes
WINDOWS = [(0, 1000), (65_000, 400_123), (-1, None)]


def _windows(size: int) -> list[tuple[int, int]]:
    return [(s, e) if s >= 0 else (size - 777, size) for s, e in WINDOWS]


@pytest.fixture(scope="module")
def s3_shards(s3_server, sample_shards):
    s3_server.upload_dir(sample_shards, BUCKET, "shards")
    return f"{BUCKET}/shards"


@pytest.fixture(scope="module")
def http_shards(http_server, sample_shards):
    http_server.add_dir(sample_shards, "servers-test/shards")
    return "/servers-test/shards"


@pytest.fixture(scope="module")
def gcs_shards(gcs_server, sample_shards):
    gcs_server.upload_dir(sample_shards, BUCKET, "shards")
    return f"{BUCKET}/shards"


# ---- helpers without servers ----


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("VLORA_REQUIRE_SERVERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_x is missing: pip install it"):
        require("no_such_module_x", "pip install it")
    monkeypatch.setenv("VLORA_REQUIRE_SERVERS", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_module_x is missing: pip install it"):
        require("no_such_module_x", "pip install it")
    assert require("json", "stdlib") is not None  # present: returns its spec, no skip
    assert require("sh", "a binary on PATH").endswith("/sh")


def test_parse_range_and_object_get_classifier():
    assert parse_range("bytes=5-9") == (5, 10)
    assert parse_range("bytes=5-") == (5, None)
    assert parse_range("bytes=-3") == (-3, None)
    assert parse_range(None) is None
    assert is_object_get("GET", "/bucket/shards/a.tar", "")
    assert is_object_get("GET", "/a.tar", "")  # nginx, top-level file
    assert not is_object_get("HEAD", "/bucket/shards/a.tar", "")
    assert not is_object_get("GET", "/bucket", "list-type=2&prefix=shards%2F")  # S3 listing
    assert not is_object_get("GET", "/dir/", "")  # autoindex listing
    assert is_object_get("GET", "/download/storage/v1/b/bkt/o/a%2Fb.tar", "alt=media")
    assert is_object_get("GET", "/storage/v1/b/bkt/o/a%2Fb.tar", "alt=media")
    assert not is_object_get("GET", "/storage/v1/b/bkt/o/a%2Fb.tar", "")  # GCS metadata
    assert not is_object_get("GET", "/storage/v1/b/bkt/o", "prefix=a/")  # GCS listing


# ---- S3 (moto) ----


def test_s3_listing_and_ranged_reads_through_proxy(s3_server, s3_shards, sample_shards, fault_proxy):
    proxy = fault_proxy(s3_server.endpoint)
    fs = s3_server.filesystem(proxy.url)
    data = (sample_shards / SHARD).read_bytes()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_shards, detail=False)) == sorted(
        p.name for p in sample_shards.iterdir())
    for start, end in _windows(len(data)):
        assert fs.cat_file(f"{s3_shards}/{SHARD}", start=start, end=end) == data[start:end]
    assert fs.cat_file(f"{s3_shards}/manifest.json") == (sample_shards / "manifest.json").read_bytes()
    gets = proxy.object_gets(SHARD)
    assert [g["range"] for g in gets] == [f"bytes={s}-{e - 1}" for s, e in _windows(len(data))]
    assert [g["bytes"] for g in gets] == [e - s for s, e in _windows(len(data))]
    assert all(g["status"] == 206 and g["fault"] is None for g in gets)
    assert min(s for s, _ in proxy.requested_ranges(SHARD)) == 0


def test_s3_faults_reach_client_at_planned_requests(s3_server, s3_shards, sample_shards, fault_proxy):
    import aiohttp

    proxy = fault_proxy(s3_server.endpoint, FaultPlan(status_503=[2], cut=[3], cut_after=1000, match=".tar"))
    fs = s3_server.filesystem(proxy.url)  # no retries in s3fs or botocore: each fault surfaces
    data = (sample_shards / SHARD).read_bytes()
    path = f"{s3_shards}/{SHARD}"
    assert fs.cat_file(f"{s3_shards}/manifest.json")  # not a .tar: not counted by the plan
    assert fs.cat_file(path, start=0, end=300_000) == data[:300_000]
    with pytest.raises(OSError, match="FaultProxy injected"):  # s3fs turns the 503 ClientError into an OSError
        fs.cat_file(path, start=300_000, end=600_000)
    with pytest.raises(aiohttp.ClientPayloadError, match="received 1000 of 300000 bytes"):
        fs.cat_file(path, start=600_000, end=900_000)
    assert fs.cat_file(path, start=900_000, end=1_200_000) == data[900_000:1_200_000]
    proxy.wait_idle()
    gets = proxy.object_gets()
    assert [(g["match_n"], g["range"], g["fault"], g["status"], g["bytes"]) for g in gets] == [
        (1, "bytes=0-299999", None, 206, 300_000), (2, "bytes=300000-599999", "status_503", 503, gets[1]["bytes"]),
        (3, "bytes=600000-899999", "cut", 206, 1000), (4, "bytes=900000-1199999", None, 206, 300_000)]
    assert gets[3]["conn"] != gets[2]["conn"]  # the cut closed its connection; the client opened another


def test_s3_endpoint_from_environment(s3_server, s3_shards, sample_shards, monkeypatch):
    import fsspec

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)  # no endpoint kwarg: botocore reads AWS_ENDPOINT_URL
    assert fs.cat_file(f"{s3_shards}/manifest.json") == (sample_shards / "manifest.json").read_bytes()


def test_s3_signatures_verified_through_proxy(sample_shards, fault_proxy):
    # a moto of its own that checks SigV4: the proxy must pass Host, Authorization, x-amz-* and the path unchanged
    require("moto", "the S3 test server needs it (pip install 'moto[server]')")
    server = servers.MotoS3Server(verify_signatures=True).start()
    try:
        proxy = fault_proxy(server.endpoint)
        client = server.boto3_client(proxy.url)
        client.create_bucket(Bucket="vlora-signed")
        client.put_object(Bucket="vlora-signed", Key="a b/manifest.json",  # a key that needs percent-encoding
                          Body=(sample_shards / "manifest.json").read_bytes())
        fs = server.filesystem(proxy.url)
        assert fs.cat_file("vlora-signed/a b/manifest.json", start=3, end=50) == (
            sample_shards / "manifest.json").read_bytes()[3:50]
        import botocore.exceptions

        with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
            server.boto3_client(proxy.url, secret="wrong").list_objects_v2(Bucket="vlora-signed")
    finally:
        server.stop()


# ---- HTTP (nginx) ----


def test_nginx_range_is_206_with_exact_bytes_and_logged(http_server, http_shards, sample_shards):
    data = (sample_shards / SHARD).read_bytes()
    before = len(http_server.access_log())
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    try:
        conn.request("GET", f"{http_shards}/{SHARD}", headers={"Range": "bytes=1000-70999"})
        resp = conn.getresponse()
        body = resp.read()
        assert (resp.status, resp.getheader("Content-Range")) == (206, f"bytes 1000-70999/{len(data)}")
        assert body == data[1000:71000]
        conn.request("GET", f"{http_shards}/{SHARD}", headers={"Range": f"bytes={len(data) - 10}-"})
        assert conn.getresponse().read() == data[-10:]
    finally:
        conn.close()
    log = http_server.wait_log(before + 2)[before:]
    assert [(e["method"], e["uri"], e["range"], e["status"], e["bytes"]) for e in log] == [
        ("GET", f"{http_shards}/{SHARD}", "bytes=1000-70999", 206, 70_000),
        ("GET", f"{http_shards}/{SHARD}", f"bytes={len(data) - 10}-", 206, 10)]
    assert log[1]["connection"] == log[0]["connection"] and log[1]["connection_requests"] == 2  # keep-alive


def test_http_faults_through_proxy(http_server, http_shards, sample_shards, fault_proxy):
    import aiohttp
    import fsspec

    proxy = fault_proxy(http_server.url, FaultPlan(status_503=[2], cut=[3], cut_after=4096))
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    data = (sample_shards / SHARD).read_bytes()
    url = f"{proxy.url}{http_shards}/{SHARD}"
    before = len(http_server.access_log())
    assert sorted(u.rsplit("/", 1)[1] for u in fs.ls(f"{proxy.url}{http_shards}/", detail=False)) == sorted(
        p.name for p in sample_shards.iterdir())  # autoindex listing: not an object GET
    assert fs.cat_file(url, start=10, end=200_010) == data[10:200_010]
    with pytest.raises(aiohttp.ClientResponseError) as err:
        fs.cat_file(url, start=200_010, end=400_010)
    assert err.value.status == 503
    with pytest.raises(aiohttp.ClientPayloadError, match="received 4096 of 200000 bytes"):
        fs.cat_file(url, start=400_010, end=600_010)
    assert fs.cat_file(url, start=600_010, end=800_010) == data[600_010:800_010]
    proxy.wait_idle()
    gets = proxy.object_gets()
    assert [(g["range"], g["fault"], g["status"]) for g in gets] == [
        ("bytes=10-200009", None, 206), ("bytes=200010-400009", "status_503", 503),
        ("bytes=400010-600009", "cut", 206), ("bytes=600010-800009", None, 206)]
    assert [g["bytes"] for g in gets if g["fault"] != "status_503"] == [200_000, 4096, 200_000]
    # nginx saw the listing and the three forwarded reads, never the one the proxy answered with a 503
    ranges = [e["range"] for e in http_server.wait_log(before + 4)[before:]]
    assert ranges == ["", "bytes=10-200009", "bytes=400010-600009", "bytes=600010-800009"]


def test_proxy_keepalive_match_and_cut_closes_connection(http_server, http_shards, sample_shards, fault_proxy):
    data = (sample_shards / SHARD).read_bytes()
    proxy = fault_proxy(http_server.url, FaultPlan(cut=[2], cut_after=100, match="shard-000001"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(3):  # shard 0: not matched, never faulted, one connection throughout
            conn.request("GET", f"{http_shards}/{SHARD}", headers={"Range": "bytes=0-99999"})
            assert conn.getresponse().read() == data[:100_000]
        other = (sample_shards / "shard-000001.tar").read_bytes()
        for n, expect in ((1, other[5:5005]), (2, None)):
            conn.request("GET", f"{http_shards}/shard-000001.tar", headers={"Range": "bytes=5-5004"})
            resp = conn.getresponse()
            if expect is not None:
                assert resp.read() == expect
                continue
            assert resp.getheader("Content-Length") == "5000" and resp.getheader("Connection") == "close"
            with pytest.raises(http.client.IncompleteRead) as err:
                resp.read()
            assert err.value.partial == other[5:105]
    finally:
        conn.close()
    log = proxy.log
    assert [e["conn"] for e in log] == [log[0]["conn"]] * 5
    assert [e["match_n"] for e in log] == [None, None, None, 1, 2] and log[-1]["fault"] == "cut"


def test_proxy_stop_closes_idle_keepalive_connections(http_server, http_shards):
    proxy = FaultProxy(http_server.url).start()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(f"GET {http_shards}/manifest.json HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
        proxy.wait_idle()
        t0 = time.monotonic()
        proxy.stop()  # the client still holds its keep-alive connection open
        assert time.monotonic() - t0 < 2
        while sock.recv(65536):  # the rest of the response, then EOF: the proxy closed its end
            pass
    finally:
        sock.close()


# ---- GCS (gcp-storage-emulator) ----


def test_gcs_listing_ranged_reads_and_retry_through_proxy(gcs_server, gcs_shards, sample_shards, fault_proxy):
    proxy = fault_proxy(gcs_server.endpoint)
    fs = gcs_server.filesystem(proxy.url)
    data = (sample_shards / SHARD).read_bytes()
    path = f"{gcs_shards}/{SHARD}"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(gcs_shards, detail=False)) == sorted(
        p.name for p in sample_shards.iterdir())
    for start, end in _windows(len(data)):
        assert fs.cat_file(path, start=start, end=end) == data[start:end]
    assert [g["range"] for g in proxy.object_gets(SHARD)] == [f"bytes={s}-{e - 1}" for s, e in _windows(len(data))]
    # gcsfs retries a 503 by itself (after a 1-2 s sleep): the caller gets the bytes, the log shows both tries
    proxy.set_plan(FaultPlan(status_503=[1]))
    proxy.clear_log()
    assert fs.cat_file(path, start=123, end=4567) == data[123:4567]
    assert [(g["range"], g["fault"], g["status"]) for g in proxy.object_gets()] == [
        ("bytes=123-4566", "status_503", 503), ("bytes=123-4566", None, 206)]
