"""Shards behind URLs (vlora/data/remote.py) without a server: the retry loop on a scripted client, pipe: folders
(a real subprocess per read), the manifest's sample offsets, URL parsing and redaction."""

import json
import logging
import tarfile

import pytest

from vlora.data import remote
from vlora.data.manifest import read_manifest
from vlora.data.stream import ShardReader, ShardSet, parse_sources, read_samples
from vlora.errors import VloraError

FAST = remote.RetryPolicy(retries=3, backoff_s=0.001)


def test_every_sample_offset_in_the_manifest_starts_that_sample(demo_shards):
    """The packer's per-sample offsets: the tar header there is the sample's first file, for every sample."""
    manifest = read_manifest(demo_shards / "train")
    for entry in manifest["shards"]:
        with tarfile.open(demo_shards / "train" / entry["name"]) as tar:
            firsts, seen = [], set()
            for info in tar:
                key = info.name.split(".", 1)[0]
                if key not in seen:
                    seen.add(key)
                    firsts.append((info.offset, key))
        assert [o for o, _ in firsts] == entry["offsets"] and len(firsts) == entry["samples"] == 32


def test_a_shard_opened_at_an_offset_gives_the_samples_from_there(demo_shards):
    src = ShardSet.load(str(demo_shards / "train"))
    whole = ShardReader(**src.shard(2), offset=0)
    keys = [whole.next()["__key__"] for _ in range(src.sizes[2])]
    for offset in (1, 17, 31):
        reader = ShardReader(**src.shard(2), offset=offset)
        assert [reader.next()["__key__"] for _ in range(offset, src.sizes[2])] == keys[offset:]


def test_manifest_offsets_that_cannot_be_right_are_refused(demo_shards, tmp_path):
    import shutil

    folder = tmp_path / "val"
    shutil.copytree(demo_shards / "val", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["offsets"][3] = manifest["shards"][1]["offsets"][2]  # not rising
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VloraError, match=r"manifest.json: shard shard-000001.tar's 'offsets' are not one rising"):
        read_manifest(folder)


def scripted(monkeypatch, script):
    """The store's client answers range reads from `script`: per call, bytes to return (maybe short) or an
    exception to raise, as s3fs / gcsfs / fsspec's HTTP client would."""
    calls = []

    class Client:
        def cat_file(self, path, start, end):
            calls.append((start, end))
            step = script.pop(0)
            if isinstance(step, BaseException):
                raise step
            return step(start, end)

    monkeypatch.setattr(remote, "filesystem", lambda url: (Client(), url))
    return calls


DATA = bytes(range(256)) * 4


def test_a_failed_or_short_read_goes_on_from_the_first_missing_byte(monkeypatch, caplog):
    calls = scripted(monkeypatch, [
        ConnectionResetError("reset by peer"),
        lambda s, e: DATA[s:s + 100],  # a body cut short after 100 bytes: kept, the rest asked for
        OSError("503 Service Unavailable"),
        lambda s, e: DATA[s:e],
    ])
    with caplog.at_level(logging.WARNING, logger="vlora"):
        got = remote.read_range("s3://bucket/set/shard-000003.tar", 10, 1000, FAST)
    assert got == DATA[10:1000]
    assert calls == [(10, 1000), (10, 1000), (110, 1000), (110, 1000)]  # no byte asked for twice once received
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert "s3://bucket/set/shard-000003.tar: read at byte 10 failed (ConnectionResetError: reset by peer)" in retries[0]
    assert "at byte 110 failed (OSError: 503 Service Unavailable); retry 2 of 3" in retries[2]


def test_reads_that_keep_failing_stop_the_run_naming_the_shard_and_byte(monkeypatch):
    scripted(monkeypatch, [TimeoutError("timed out")] * 4)
    with pytest.raises(VloraError) as e:
        remote.read_range("https://user:secret@host:8080/data/shard-000001.tar?sig=KEY", 4096, 8192, FAST)
    msg = str(e.value)
    assert "\n" not in msg and "https://host:8080/data/shard-000001.tar: read at byte 4096 failed 4 times" in msg
    assert "secret" not in msg and "KEY" not in msg


def test_what_a_retry_cannot_mend_stops_at_once(monkeypatch):
    calls = scripted(monkeypatch, [FileNotFoundError("s3://b/p/shard-000000.tar")])
    with pytest.raises(VloraError, match=r"s3://b/p/shard-000000.tar: read at byte 0 failed: FileNotFoundError"):
        remote.read_range("s3://b/p/shard-000000.tar", 0, 10, FAST)
    assert len(calls) == 1
    scripted(monkeypatch, [lambda s, e: DATA])  # 200 with the whole body: the server ignored the range
    with pytest.raises(VloraError, match=r"asked for 10 bytes, got 1024: the server ignores byte ranges"):
        remote.read_range("https://h/p/shard-000000.tar", 0, 10, FAST)


def test_a_shard_replaced_in_the_store_is_refused(monkeypatch):
    monkeypatch.setattr(remote, "remote_size", lambda url: 5000)
    with pytest.raises(VloraError, match=r"s3://b/p/shard-000002.tar has 5000 bytes, its manifest.json says 4096"):
        remote.open_shard("s3://b/p/shard-000002.tar", 4096, 0, FAST)


def test_urls_parse_as_folders_with_weights():
    assert parse_sources("s3://bucket/set") == [("s3://bucket/set", 1.0)]
    assert parse_sources("s3://bucket/a:2,https://host:8443/b:0.5,gs://c/d") == [
        ("s3://bucket/a", 2.0), ("https://host:8443/b", 0.5), ("gs://c/d", 1.0)]
    assert parse_sources("pipe:aws s3 cp s3://b/p/{name} -:3") == [("pipe:aws s3 cp s3://b/p/{name} -", 3.0)]
    assert parse_sources("https://host:8080") == [("https://host:8080", 1.0)]  # a port, not a weight
    assert parse_sources("https://host:8080/set:2") == [("https://host:8080/set", 2.0)]
    with pytest.raises(VloraError, match="lists 's3://b/a/' twice"):
        parse_sources("s3://b/a,s3://b/a/")
    assert remote.join("s3://b/p/", "manifest.json") == "s3://b/p/manifest.json"
    assert remote.join("pipe:cat /d/{name}", "shard-000001.tar") == "pipe:cat /d/shard-000001.tar"
    with pytest.raises(VloraError, match=r"a pipe: folder needs \{name\}"):
        remote.join("pipe:cat /d/x", "manifest.json")
    assert remote.redact("https://u:p@h:1/x/y.tar?X-Amz-Signature=s") == "https://h:1/x/y.tar"
    assert remote.redact("pipe:curl -s 'https://u:p@h/x/shard.tar?sig=s'") == "pipe:curl -s 'https://h/x/shard.tar'"


def flaky_pipe(tmp_path, folder, fail_at: int, failures: int) -> str:
    """pipe:COMMAND over `folder` whose first `failures` runs for a shard die after `fail_at` bytes (status 1)."""
    script = tmp_path / "flaky.sh"
    script.write_text(f"""#!/bin/sh
f="{folder}/$1"; n="{tmp_path}/runs.$1"
echo x >> "$n"
case "$1" in shard-*) if [ "$(wc -l < "$n")" -le {failures} ]; then head -c {fail_at} "$f"; exit 1; fi;; esac
cat "$f"
""")
    script.chmod(0o755)
    return f"pipe:{script} {{name}}"


def test_a_pipe_folder_reads_what_the_folder_holds_and_reruns_a_failed_command(demo_shards, tmp_path, caplog):
    folder = demo_shards / "val"
    local = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples(str(folder), 64)]
    url = flaky_pipe(tmp_path, folder, fail_at=30000, failures=2)
    with caplog.at_level(logging.WARNING, logger="vlora"):
        piped = list(read_samples(url, 64, FAST))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in piped] == local and len(local) == 64
    reruns = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(reruns) == 4  # two failed runs for each of the two shards
    assert all("the command exited with status 1 at byte 30000" in m for m in reruns), reruns
    runs = {p.name: len(p.read_text().split()) for p in tmp_path.glob("runs.*")}
    assert runs == {"runs.manifest.json": 1, "runs.shard-000000.tar": 3, "runs.shard-000001.tar": 3}


def test_http_statuses_sort_into_retried_and_final(monkeypatch):
    """What the clients raise: aiohttp's ClientResponseError (.status) and botocore's ClientError (.response)."""
    import aiohttp
    from botocore.exceptions import ClientError

    from yarl import URL

    signed = URL("https://h/p/shard-000000.tar?X-Amz-Signature=SECRET")

    def http(status):
        info = aiohttp.RequestInfo(url=signed, method="GET", headers={}, real_url=signed)
        return aiohttp.ClientResponseError(info, (), status=status, message="x")

    def s3(status):
        return ClientError({"Error": {"Code": "X", "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")

    for error, final in [(http(403), True), (http(404), True), (http(503), False), (http(500), False),
                         (s3(403), True), (s3(503), False), (ConnectionResetError("reset"), False)]:
        calls = scripted(monkeypatch, [error, lambda s, e: DATA[s:e]])
        if final:
            with pytest.raises(VloraError, match=r"read at byte 0 failed: .*\(HTTP 40[34]\)") as e:
                remote.read_range("https://h/p/shard-000000.tar", 0, 10, FAST)
            assert len(calls) == 1 and "SECRET" not in str(e.value)
        else:
            assert remote.read_range("https://h/p/shard-000000.tar", 0, 10, FAST) == DATA[:10] and len(calls) == 2


def test_a_pipe_command_that_writes_much_to_stderr_does_not_hang(tmp_path):
    """stderr goes to a file: 1 MB of it (a progress meter) cannot fill a pipe and block the command."""
    data = bytes(range(256)) * 400
    (tmp_path / "f.bin").write_bytes(data)
    url = f"pipe:head -c 1000000 /dev/zero >&2; cat {tmp_path}/{{name}}"
    f = remote.open_shard(remote.join(url, "f.bin"), len(data), 1000, FAST)
    try:
        assert f.read() == data[1000:]
    finally:
        f.close()


def test_closing_a_shard_abandons_a_read_that_is_retrying(monkeypatch):
    """A read in flight for a closed file stops at its next wait instead of retrying on (and holding the exit)."""
    import threading
    import time

    monkeypatch.setattr(remote, "remote_size", lambda url: 100)
    failing = threading.Event()

    class Client:
        def cat_file(self, path, start, end):
            failing.set()
            raise ConnectionResetError("reset")

    monkeypatch.setattr(remote, "filesystem", lambda url: (Client(), url))
    slow = remote.RetryPolicy(retries=8, backoff_s=5.0)
    f = remote.RangeFile("s3://b/p/shard-000000.tar", 100, 0, slow)
    assert failing.wait(5)
    started = time.monotonic()
    f.close()
    f.pool.shutdown(wait=True)  # the reading thread ends: its 5 s wait was cut short
    assert time.monotonic() - started < 2


def test_a_local_shard_whose_offsets_are_wrong_fails_in_one_line(demo_shards, tmp_path):
    import shutil

    folder = tmp_path / "val"
    shutil.copytree(demo_shards / "val", folder)
    src = ShardSet.load(str(folder))
    shard = src.shard(0)
    wrong = list(shard["starts"])
    wrong[5] = wrong[5] + 512  # inside the sample: a block of image bytes, not a tar header
    reader = ShardReader(**{**shard, "starts": wrong}, offset=5)
    with pytest.raises(VloraError) as e:
        for _ in range(3):
            reader.next()
    assert "\n" not in str(e.value) and "shard-000000.tar: not a readable tar from sample 5" in str(e.value)


def test_a_pipe_that_writes_more_than_the_manifest_says_is_refused(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 5000)
    f = remote.open_shard(remote.join(f"pipe:cat {tmp_path}/{{name}}", "f.bin"), 4096, 0, FAST)
    try:
        with pytest.raises(VloraError, match=r"f.bin: the command writes more than the 4096 bytes its manifest.json"):
            f.read()
    finally:
        f.close()
