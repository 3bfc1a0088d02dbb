"""launch/bench_gpu.sh, the bench's GPU command, in its CPU dry run: the install from a local wheelhouse that the
GPU machine does (no index, no network), then `vlora bench` on the tiny model (docs/speed.md, "On a GPU")."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

SCRIPT = REPO / "launch" / "bench_gpu.sh"


def make_wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel of a package `vlora_probe` that no environment has: what pip installs from it can
    only have come from the wheelhouse."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"vlora_probe-{version}.dist-info"
    files = {"vlora_probe/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: vlora-probe\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = folder / f"vlora_probe-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def dry_run(tmp_path: Path, wheels: Path, model: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """The script (its dry run unless `args` say otherwise) with this test's wheelhouse, a clean install target and
    output folder, and no index."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, BENCH_WHEELS=str(wheels), BENCH_SITE=str(tmp_path / "site"),
               BENCH_OUT=str(tmp_path / "out"), BENCH_DRY_MODEL=str(model), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1",
               **env_extra)
    return subprocess.run(["bash", str(SCRIPT), *(args or ["--dry-run"])], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def table_value(output: str, label: str) -> float:
    """The vlora column of one row of the bench's table (`tokens/s   3,459`)."""
    match = re.search(rf"^{re.escape(label)}\s+([\d,.]+)", output, re.M)
    assert match, f"no '{label}' row in:\n{output}"
    return float(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_dry_run_installs_the_wheelhouse_and_runs_a_bench_step(tmp_path, tiny_model_dir):
    make_wheel(tmp_path / "wheels", "1.0")
    r = dry_run(tmp_path, tmp_path / "wheels", tiny_model_dir)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    # Installed into the target, and found there first (the script prints where each carried package loads from).
    site = tmp_path / "site"
    assert (site / "vlora_probe" / "__init__.py").is_file()
    assert f"carried vlora-probe 1.0 from {site}" in r.stdout, r.stdout
    code = "import vlora_probe; print(vlora_probe.__file__, vlora_probe.VERSION)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True)
    assert probe.stdout.split() == [str(site / "vlora_probe" / "__init__.py"), "1.0"], probe.stderr
    assert "GPU: none" in r.stdout and "torch " in r.stdout  # the versions block, before the bench

    # The bench ran one step and printed its figures, and wrote them as JSON and the whole output as a log.
    assert table_value(r.stdout, "tokens/s") > 0
    assert table_value(r.stdout, "ops total") > 100  # the tiny model's step is over a thousand operator calls
    figures = json.loads((tmp_path / "out" / "dry.json").read_text())["results"]["vlora"]
    assert figures["tokens_per_s"] > 0 and figures["tokens_per_step"] > 0
    assert all(figures["counts"][part]["ops"] > 0 for part in ("vision", "llm", "loss", "optimizer"))
    log = (tmp_path / "out" / "bench.log").read_text()
    assert "GPU: none" in log and "ops total" in log


def test_two_versions_of_one_package_are_refused_before_pip_runs(tmp_path):
    for version in ("1.0", "1.1"):
        make_wheel(tmp_path / "wheels", version)
    r = dry_run(tmp_path, tmp_path / "wheels", tmp_path / "no-model")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "two versions of: vlora_probe" in r.stderr
    assert not (tmp_path / "site").exists()  # nothing installed, no bench started
    assert "vlora bench" not in r.stdout


def test_an_empty_wheelhouse_is_one_sentence(tmp_path):
    (tmp_path / "wheels").mkdir()
    r = dry_run(tmp_path, tmp_path / "wheels", tmp_path / "no-model")
    assert r.returncode == 2 and "make gpu-wheels" in r.stderr, r.stderr


def test_the_gpu_run_skips_what_its_time_cannot_hold_and_runs_what_the_docs_say(tmp_path):
    """The GPU mode's sequence without a GPU: with 30 s for all the runs, each is skipped, none started; the runs
    are docs/speed.md's table ("On a GPU"), in its order, with its arguments."""
    make_wheel(tmp_path / "wheels", "1.0")
    r = dry_run(tmp_path, tmp_path / "wheels", tmp_path / "no-model", "", BENCH_BUDGET_S="30")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    skipped = re.findall(r"^== (\S+): skipped, -?\d+s left: vlora bench (.*)$", r.stdout, re.M)
    documented = re.findall(r"^\| `(\S+)\.json` \| `(.*?)` \|", (REPO / "docs" / "speed.md").read_text(), re.M)
    assert skipped == documented and len(skipped) >= 2, (skipped, documented)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.log"]
