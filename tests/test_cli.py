"""The `vlora` command: subcommands run, and bad input ends in one line and exit status 2."""

import subprocess
import sys

from helpers import REPO


def vlora(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vlora.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_pack_missing_source_is_one_line(tmp_path):
    proc = vlora("pack", "--src", tmp_path / "nope.jsonl", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("vlora: error:") and "nope.jsonl" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_pack_then_summary_balances(demo_src, tmp_path):
    proc = vlora("pack", "--src", demo_src / "val.jsonl", "--out", tmp_path / "val", "--shard-size", 16)
    assert proc.returncode == 0, proc.stderr
    assert "read 64, wrote 64 in 4 shard(s), rejected 0" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "val").glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]
