"""Training from shard folders in real stores on localhost (moto's S3 server, nginx, the GCS emulator; started by
tests/servers.py): the same per-step losses as from the same shards on disk, through a proxy that cuts connections
and answers 503, and across a pre-emption mid-shard, after which no byte before the resume offset is asked for."""

import json

import pytest

import servers
from helpers import train_in_process
from servers import FaultPlan
from vlora.data import remote
from vlora.data.manifest import read_manifest
from vlora.data.stream import DatasetReader, ShardSet
from vlora.errors import VloraError

s3_server, http_server, gcs_server, fault_proxy = servers.s3_server, servers.http_server, servers.gcs_server, \
    servers.fault_proxy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:This DataLoader will create")]

BUCKET = "vlora-remote"
STEPS = 8
RUN = {"optim.max_steps": STEPS, "optim.global_batch": 4, "optim.micro_batch": 4, "run.log_every": 1,
       "data.val_samples": 8, "data.open_shards": 2, "run.plot": "false"}


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in records for k in ("loss", "val_loss") if k in r}


@pytest.fixture(scope="module")
def local_losses(tiny_model_dir, demo_shards, tmp_path_factory):
    """local_losses(workers): the losses of the run from the shards on disk, with as many data workers (and so as
    many torch threads: the sums' order, and their last bits, follow the thread count)."""
    memo = {}

    def get(workers: int) -> dict:
        if workers not in memo:
            with pytest.MonkeyPatch.context() as mp:
                run = train_in_process(mp, tiny_model_dir, demo_shards, tmp_path_factory.mktemp("local"),
                                       **{**RUN, "data.num_workers": workers})
            memo[workers] = losses(run.dir)
            assert len([k for k in memo[workers] if k[1] == "loss"]) == STEPS
        return memo[workers]

    return get


@pytest.fixture
def clients(monkeypatch):
    """Fresh store clients for each test: they read their endpoint from the environment when first made."""
    monkeypatch.setattr(remote, "_filesystems", {})
    return monkeypatch


def stored(kind: str, demo_shards, server, endpoint: str | None = None):
    """(train URL, val URL, environment) of the demo shards uploaded to `server`, a store of `kind` (once per
    server), reached at `endpoint` (a proxy) or at the server itself."""
    if kind == "http":
        if not (server.root / "demo").is_dir():
            server.add_dir(demo_shards, "demo")
        base = f"{endpoint or server.url}/demo"
        return f"{base}/train", f"{base}/val", {}
    if not getattr(server, "_vlora_demo", False):
        for part in ("train", "val"):
            server.upload_dir(demo_shards / part, BUCKET, f"demo/{part}")
        server._vlora_demo = True
    if kind == "s3":
        return f"s3://{BUCKET}/demo/train", f"s3://{BUCKET}/demo/val", server.env(endpoint)
    return f"gs://{BUCKET}/demo/train", f"gs://{BUCKET}/demo/val", {"STORAGE_EMULATOR_HOST": endpoint or server.endpoint}


def server_for(kind: str, request):
    return request.getfixturevalue({"s3": "s3_server", "http": "http_server", "gs": "gcs_server"}[kind])


@pytest.mark.parametrize("kind", ["s3", "http", "gs"])
def test_training_from_a_store_gives_the_losses_of_the_same_shards_on_disk(kind, request, clients, tiny_model_dir,
                                                                            demo_shards, local_losses, tmp_path):
    server = server_for(kind, request)
    train, val, env = stored(kind, demo_shards, server)
    for k, v in env.items():
        clients.setenv(k, v)
    run = train_in_process(clients, tiny_model_dir, demo_shards, tmp_path, **{
        **RUN, "data.train": train, "data.val": val, "data.num_workers": 1})  # read in a worker process
    assert losses(run.dir) == local_losses(1)


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_cut_connections_and_503s_are_retried_and_lose_nothing(kind, request, clients, fault_proxy, capfd,
                                                               tiny_model_dir, demo_shards, local_losses, tmp_path):
    """Faults on the 1st, 2nd (two in a row on one read), 4th and 6th shard reads: the losses are the local run's,
    and the log has one retry line per fault, naming the shard and the byte."""
    server = server_for(kind, request)
    upstream = server.endpoint if kind == "s3" else server.url
    proxy = fault_proxy(upstream, FaultPlan(status_503=[1, 4], cut=[2, 6], cut_after=3000, match="/train/shard-"))
    train, val, env = stored(kind, demo_shards, server, endpoint=proxy.url)
    for k, v in env.items():
        clients.setenv(k, v)
    capfd.readouterr()
    run = train_in_process(clients, tiny_model_dir, demo_shards, tmp_path, **{
        **RUN, "data.train": train, "data.val": val, "data.num_workers": 0, "data.retries": 3})
    assert losses(run.dir) == local_losses(0)
    faults = [e for e in proxy.log if e["fault"]]
    assert sorted(e["fault"] for e in faults) == ["cut", "cut", "status_503", "status_503"]
    retries = [line for line in capfd.readouterr().err.splitlines() if "; retry " in line]
    assert len(retries) == len(faults), retries  # every fault seen, logged once, and retried
    assert all("/demo/train/shard-" in m and " read at byte " in m for m in retries), retries
    assert sum("retry 2 of 3" in m for m in retries) == 1  # the 1st and 2nd reads were one read, failing twice


def test_a_run_preempted_mid_shard_resumes_from_the_store_without_asking_for_earlier_bytes(
        clients, http_server, tiny_model_dir, demo_shards, local_losses, tmp_path):
    from vlora.train import Preempted

    train, val, _ = stored("http", demo_shards, http_server)
    run_cfg = {**RUN, "data.train": train, "data.val": val, "data.num_workers": 0}
    clients.setenv("VLORA_FAILPOINTS", "term@step:step5")  # a SIGTERM as step 5 starts: saved after step 4
    with pytest.raises(Preempted):
        train_in_process(clients, tiny_model_dir, demo_shards, tmp_path, **run_cfg)
    clients.delenv("VLORA_FAILPOINTS")
    seen = len(http_server.access_log())
    run = train_in_process(clients, tiny_model_dir, demo_shards, tmp_path, **{**run_cfg, "run.resume": "auto"})
    assert losses(run.dir) == local_losses(0)  # steps 1-4 from the first run, 5-8 from the resumed one

    # Where the resumed reader stands in each open shard, from the saved position (integers only), and what it asked.
    position = json.loads((run.dir / "step_00000004" / "rank00000.json").read_text())["data"]["readers"][0]
    source = ShardSet.load(str(demo_shards / "train"))
    reader = DatasetReader(source, 0, seed=0, rank=0, world_size=1, role=0, workers=1, open_shards=2,
                           **position["datasets"][0])
    resumed_at = {source.urls[reader.plan.pieces[piece][0]].rsplit("/", 1)[1]: taken
                  for piece, taken in reader.plan.slots}
    assert any(taken > 0 for taken in resumed_at.values())
    offsets = {s["name"]: s["offsets"] for s in read_manifest(demo_shards / "train")["shards"]}
    asked = [(line["uri"].rsplit("/", 1)[1], int(line["range"].split("=")[1].split("-")[0]))
             for line in http_server.wait_log(seen + 1)[seen:] if line["method"] == "GET" and "/demo/train/shard-"
             in line["uri"]]
    for name, taken in resumed_at.items():
        starts = [start for shard, start in asked if shard == name]
        assert starts and min(starts) == offsets[name][taken], (name, taken, starts)


def test_the_next_shard_is_on_its_way_before_the_open_one_ends(clients, http_server, demo_shards):
    """A remote reader keeps its next shard opened, its first bytes asked for, while the open one is read."""
    train, _, _ = stored("http", demo_shards, http_server)
    source = ShardSet.load(train)
    seen = len(http_server.access_log())
    reader = DatasetReader(source, 0, seed=0, rank=0, world_size=1, role=0, workers=1, open_shards=1)
    try:
        reader.next()  # one sample of the first shard: 31 more to go before it ends
        shards = (reader.plan.pieces[reader.plan.slots[0][0]][0], reader.plan.upcoming()[0])
        names = {source.urls[s].rsplit("/", 1)[1] for s in shards}
        gets = [line for line in http_server.wait_log(seen + 4)[seen:] if line["method"] == "GET"]
        assert {line["uri"].rsplit("/", 1)[1] for line in gets} == names and len(names) == 2
        assert all(line["range"].startswith("bytes=0-") and line["status"] == 206 for line in gets)
    finally:
        reader.close()


def test_pack_into_a_store_uploads_each_shard_and_the_manifest_last(clients, s3_server, fault_proxy, demo_src,
                                                                    demo_shards):
    from vlora.data.pack import pack

    stored("s3", demo_shards, s3_server)  # the bucket exists
    proxy = fault_proxy(s3_server.endpoint)  # no faults: its log shows the order of the requests
    for k, v in s3_server.env(proxy.url).items():
        clients.setenv(k, v)
    url = f"s3://{BUCKET}/packed/val"
    summary = pack(demo_src / "val.jsonl", url, shard_size=32)
    assert summary.out == url and summary.written == 64
    local = read_manifest(demo_shards / "val")
    assert read_manifest(url)["shards"] == local["shards"]  # names, counts, bytes, sha256, offsets
    fs = s3_server.filesystem()
    for entry in local["shards"]:
        assert fs.cat_file(f"{BUCKET}/packed/val/{entry['name']}") == (demo_shards / "val" / entry["name"]).read_bytes()
    puts = [e["path"].rsplit("/", 1)[1] for e in proxy.log if e["method"] == "PUT"]
    assert puts == ["shard-000000.tar", "shard-000001.tar", "rejects.jsonl", "manifest.json"]

    proxy.clear_log()
    pack(demo_src / "val.jsonl", url, shard_size=64)  # again, into one shard: the old set is replaced
    order = [(e["method"], e["path"].rsplit("/", 1)[1]) for e in proxy.log if e["method"] in ("PUT", "DELETE")]
    assert order == [("DELETE", "manifest.json"), ("PUT", "shard-000000.tar"), ("PUT", "rejects.jsonl"),
                     ("PUT", "manifest.json"), ("DELETE", "shard-000001.tar")]
    assert [s["samples"] for s in read_manifest(url)["shards"]] == [64]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/packed/val")) == [
        "manifest.json", "rejects.jsonl", "shard-000000.tar"]

    with pytest.raises(VloraError, match="annotation file not found"):
        pack(demo_src / "no-such.jsonl", url)  # a pack that fails on its input leaves the set there whole
    assert [s["samples"] for s in read_manifest(url)["shards"]] == [64]
    fs.pipe_file(f"{BUCKET}/packed/other/notes.txt", b"mine")
    with pytest.raises(VloraError, match=r"s3://vlora-remote/packed/other: holds 1 file\(s\) that no shard folder has"):
        pack(demo_src / "val.jsonl", f"s3://{BUCKET}/packed/other")

    with pytest.raises(VloraError, match=r"s3://no-such-bucket/x/manifest.json: (size|read) at byte 0 failed: "):
        read_manifest("s3://no-such-bucket/x")  # what a retry cannot mend fails at once, in one line


def test_a_store_that_keeps_failing_stops_the_run_in_one_line(clients, s3_server, fault_proxy, tiny_model_dir,
                                                              demo_shards, tmp_path):
    """Past data.retries failures in a row, the data worker's error reaches the trainer as one line naming the shard
    URL and the byte, not as the worker's traceback."""
    import re

    proxy = fault_proxy(s3_server.endpoint, FaultPlan(status_503=list(range(1, 40)), match="/train/shard-"))
    train, val, env = stored("s3", demo_shards, s3_server, endpoint=proxy.url)
    for k, v in env.items():
        clients.setenv(k, v)
    with pytest.raises(VloraError) as e:
        train_in_process(clients, tiny_model_dir, demo_shards, tmp_path, **{
            **RUN, "data.train": train, "data.val": val, "data.num_workers": 1, "data.retries": 2})
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert re.fullmatch(r"s3://vlora-remote/demo/train/shard-0000\d\d\.tar: read at byte \d+ failed 3 times in a row, "
                        r"last: OSError: .*; the run stops here \(fix the store or raise data.retries, then resume\)", msg)
