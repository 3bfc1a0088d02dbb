"""The launch paths: two torchrun "nodes" meeting at a c10d rendezvous on one machine, launch/torchrun.sh, and
launch/slurm.sbatch without Slurm (its dry run, and its pre-emption flow with stand-ins for srun and scontrol)."""

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO, clean_env, free_port, read_jsonl, run_overrides, torchrun_cmd, wait_until

SBATCH = REPO / "launch" / "slurm.sbatch"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def stop(*procs: subprocess.Popen) -> None:
    """Cleanup after a failure: SIGTERM (torchrun passes it on to its workers, which save and exit), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def train_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in read_jsonl(path) if "loss" in r]


def test_launch_scripts_parse():
    for script in (SBATCH, TORCHRUN_SH):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_sbatch_settings_are_marked_and_signals_are_forwarded():
    text = SBATCH.read_text()
    settings = text.split("# ---- settings")[1].split("# -----")[0]
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
        assert line in settings
    for name in ("CONFIG=", "GPUS_PER_NODE=", "RDZV_PORT=", "SHUTDOWN_TIMEOUT="):
        assert name in settings
    torchrun_settings = TORCHRUN_SH.read_text().split("# ---- settings")[1].split("# -----")[0]
    assert "SHUTDOWN_TIMEOUT=" in torchrun_settings and "NPROC" in torchrun_settings
    assert f"--signals-to-handle {SIGNALS}" in TORCHRUN_SH.read_text()


# srun's stand-in runs its command on this machine; with STUB_SRUN=FILE it runs nothing and plays a step
# instead: it logs what it is sent to FILE and, told USR1, writes STUB_RUN_DIR/PREEMPTED as training would.
FAKE_SRUN = """#!/bin/bash
if [ -z "${STUB_SRUN:-}" ]; then
    while [[ "$1" == --* ]]; do shift; done
    exec "$@"
fi
stop=0
trap 'echo USR1 >> "$STUB_SRUN"; stop=1' USR1
trap 'echo TERM >> "$STUB_SRUN"; exit 143' TERM
echo "started $*" >> "$STUB_SRUN"
for _ in $(seq 1 "${STUB_TENTHS:-600}"); do
    sleep 0.1
    if [ "$stop" -gt 0 ]; then stop=$((stop + 1)); fi
    if [ "$stop" -gt 8 ]; then  # "saving" takes most of a second; further signals may come meanwhile
        mkdir -p "$STUB_RUN_DIR"; echo 7 > "$STUB_RUN_DIR/PREEMPTED"; exit 1
    fi
done
exit "${STUB_EXIT:-0}"
"""


def fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with stand-ins for srun and scontrol (which logs its arguments)."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\necho "$*" >> {shlex.quote(str(calls))}\n'
        'if [ "$1 $2" = "show hostnames" ]; then echo localhost; echo node-b; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, calls


def no_slurm_env(**extra) -> dict:
    """The test environment without any SLURM_* variable (the suite itself may run inside a Slurm job)."""
    return {k: v for k, v in clean_env(**extra).items() if not k.startswith("SLURM_") or k in extra}


def slurm_env(bin_dir: Path, **extra) -> dict:
    env = no_slurm_env(**extra)
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]"})
    return env


def test_sbatch_dry_run_prints_the_launch(tmp_path):
    # Without Slurm: one node, this host, the run folder that config + overrides give.
    proc = subprocess.run(["bash", str(SBATCH), f"run.out_dir={tmp_path}", "run.name=dry", "optim.lr=1e-4"],
                          cwd=tmp_path, env=no_slurm_env(DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, command = proc.stdout.splitlines()
    assert first == f"run folder: {tmp_path / 'dry'}"
    argv = shlex.split(command)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    torchrun = argv[3:argv.index("train.py")]
    opts = dict(zip(torchrun[1::2], torchrun[2::2]))
    assert torchrun[0] == "torchrun"
    assert opts["--nnodes"] == "1" and opts["--rdzv_backend"] == "c10d" and opts["--rdzv_id"] == "local"
    assert opts["--rdzv_endpoint"] == f"{socket.gethostname()}:29500"
    assert opts["--signals-to-handle"] == SIGNALS and opts["--shutdown-timeout"] == "300"
    # the user's overrides pass through; resuming the run's latest checkpoint comes last, so it wins
    assert argv[argv.index("train.py"):] == [
        "train.py", "--config", "vlora/configs/demo.yaml", f"run.out_dir={tmp_path}", "run.name=dry",
        "optim.lr=1e-4", "run.resume=auto", "run.overwrite=false"]
    assert not (tmp_path / "dry").exists()

    # Under (stand-in) Slurm: the rendezvous is on the job's first node, the job id names it.
    bin_dir, calls = fake_slurm(tmp_path)
    env = slurm_env(bin_dir, DRY_RUN="1", SLURM_NNODES="2", GPUS_PER_NODE="4", RDZV_PORT="29611",
                    SLURM_SUBMIT_DIR=str(REPO), CONFIG=str(tmp_path / "nope.yaml"))
    proc = subprocess.run(["bash", str(SBATCH), f"run.out_dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"vlora: error: config file {tmp_path / 'nope.yaml'} does not exist"]
    env["CONFIG"] = "vlora/configs/demo.yaml"
    proc = subprocess.run(["bash", str(SBATCH), f"run.out_dir={tmp_path}", "run.name=x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.splitlines()[1])
    torchrun = argv[3:argv.index("train.py")]
    opts = dict(zip(torchrun[1::2], torchrun[2::2]))
    assert (opts["--nnodes"], opts["--nproc_per_node"], opts["--rdzv_id"]) == ("2", "4", "4242")
    assert opts["--rdzv_endpoint"] == "localhost:29611"
    assert set(calls.read_text().splitlines()) == {"show hostnames node-[a-b]"}  # and no requeue


def test_sbatch_bad_override_is_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SBATCH), "optim.learning_rate=1"], cwd=tmp_path,
                          env=no_slurm_env(DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlora: error: unknown config key 'optim.learning_rate'")


CASES = {
    # name: (signals sent to the batch shell, how the step ends unsignalled, a stale PREEMPTED, restarts so far)
    "usr1": (["USR1"], 0, False, 0),
    "term": (["TERM"], 0, False, 0),
    "usr1-then-term": (["USR1", "TERM"], 0, False, 0),
    "fails": ([], 3, False, 0),
    "stale-marker": ([], 0, True, 1),
    "too-many-restarts": (["USR1"], 0, False, 20),
}


@pytest.mark.parametrize("case", CASES)
def test_sbatch_signal_flow(tmp_path, case):
    """The batch script's own logic, with a stand-in step: what reaches srun, when it requeues, what it exits with."""
    signals, step_exit, stale, restarts = CASES[case]
    bin_dir, calls = fake_slurm(tmp_path)
    srun_log, run_dir = tmp_path / "srun.log", tmp_path / "stub"
    if stale:  # left by an earlier, pre-empted attempt
        run_dir.mkdir()
        (run_dir / "PREEMPTED").write_text("5\n")
    env = slurm_env(bin_dir, SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(REPO), STUB_SRUN=str(srun_log),
                    STUB_RUN_DIR=str(run_dir), STUB_TENTHS="600" if signals else "0", STUB_EXIT=str(step_exit),
                    SLURM_RESTART_COUNT=str(restarts))
    log = tmp_path / "batch.log"
    with open(log, "w") as out:
        batch = subprocess.Popen(["bash", str(SBATCH), f"run.out_dir={tmp_path}", "run.name=stub"], cwd=tmp_path,
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: srun_log.is_file(), 30, "srun started", proc=batch, log=log)
            for name in signals:
                os.kill(batch.pid, getattr(signal, f"SIG{name}"))
                time.sleep(0.3)
            batch.wait(timeout=30)
        finally:
            if batch.poll() is None:
                os.killpg(batch.pid, signal.SIGKILL)
    text = log.read_text()
    srun_saw = srun_log.read_text().splitlines()
    assert srun_saw[0].startswith("started --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun ") and srun_saw[0].endswith("run.resume=auto run.overwrite=false")
    requeued = "requeue 4242" in calls.read_text().splitlines()
    if signals:
        # srun answers TERM by SIGKILLing its tasks, so the script passes every signal on as USR1
        assert srun_saw[1:] == ["USR1"] * len(signals), srun_saw
        assert f"vlora: {signals[0]} at " in text
        if restarts < 20:
            assert requeued and batch.returncode == 0, text
            assert "checkpoint at step 7; requeueing job 4242" in text
        else:
            assert not requeued and batch.returncode == 1, text
            assert "not requeued: 20 restarts reached MAX_REQUEUES" in text
    else:
        assert srun_saw[1:] == [] and not requeued
        assert batch.returncode == step_exit, text
        assert not (run_dir / "PREEMPTED").exists()  # the stale marker was removed before the launch
        assert f"srun exited with status {step_exit}" in text
    assert f"attempt {restarts + 1}" in text


@pytest.mark.slow
def test_two_nodes_on_one_machine(tiny_model_dir, demo_shards, tmp_path):
    """Two torchrun agents, one process each, meet at a c10d rendezvous as two nodes would; one run folder."""
    steps, port = 4, free_port()
    overrides = run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": steps, "optim.global_batch": 4, "optim.micro_batch": 2, "run.param_digest": "true",
        "run.log_every": 1, "data.val_samples": 16, "run.plot": "false", "run.dist_timeout_s": 120})
    procs, logs = [], []
    try:
        for node in (0, 1):
            logs.append(tmp_path / f"node{node}.log")
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen(
                    torchrun_cmd(overrides, 1, "--nnodes", "2", "--rdzv_backend", "c10d",
                                 "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "two-nodes"),
                    cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            p.wait(timeout=300)
    finally:
        stop(*procs)
    text = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(t[-3000:] for t in text)
    both = "\n".join(text)
    assert "world 2 |" in both
    run = tmp_path / "t"
    assert train_steps(run) == list(range(1, steps + 1))
    digests = [read_jsonl(run / "digests" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [d["step"] for d in digests[0]] == list(range(1, steps + 1))
    assert digests[0] == digests[1]  # the two "nodes" hold identical LoRA weights after every step
    assert (run / "latest").read_text().strip() == f"step_{steps:08d}"


@pytest.mark.slow
def test_torchrun_sh_trains(tiny_model_dir, demo_shards, tmp_path):
    steps = 3
    overrides = run_overrides(tiny_model_dir, demo_shards, tmp_path, **{
        "optim.max_steps": steps, "optim.global_batch": 4, "optim.micro_batch": 2, "data.val_samples": 16,
        "run.log_every": 1, "run.plot": "false"})
    proc = subprocess.run(["bash", str(TORCHRUN_SH), *overrides], cwd=tmp_path,
                          env=clean_env(NPROC="2", CONFIG="vlora/configs/demo.yaml"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 2 |" in proc.stderr
    assert train_steps(tmp_path / "t") == [1, 2, 3]
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sbatch_preemption_checkpoints_requeues_and_resumes(tiny_model_dir, demo_shards, tmp_path):
    """USR1 to the batch script (Slurm's --signal=B:USR1) -> srun -> torchrun -> training: a checkpoint,
    runs/NAME/PREEMPTED, `scontrol requeue`; the requeued attempt resumes from that checkpoint and finishes."""
    bin_dir, calls = fake_slurm(tmp_path)
    run = tmp_path / "t"
    common = {"optim.global_batch": 2, "optim.micro_batch": 2, "data.val": "", "run.log_every": 1,
              "run.plot": "false"}
    env = slurm_env(bin_dir, SLURM_NNODES="1", GPUS_PER_NODE="1", RDZV_PORT=str(free_port()),
                    SLURM_SUBMIT_DIR=str(REPO), SHUTDOWN_TIMEOUT="120")
    log = tmp_path / "attempt1.log"
    with open(log, "w") as out:
        batch = subprocess.Popen(["bash", str(SBATCH), *run_overrides(tiny_model_dir, demo_shards, tmp_path, **common,
                                                                      **{"optim.max_steps": 1000})],
                                 cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(train_steps(run)) >= 2, 240, "two training steps", proc=batch, log=log)
            os.kill(batch.pid, signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1 does
            batch.wait(timeout=180)
        finally:
            stop(batch)
    text = log.read_text()
    assert batch.returncode == 0, text[-4000:]
    step = int((run / "PREEMPTED").read_text())
    assert step >= 2
    assert (run / "latest").read_text().strip() == f"step_{step:08d}"
    assert "requeue 4242" in calls.read_text().splitlines()
    assert f"checkpoint at step {step}; requeueing job 4242" in text

    # The requeued attempt: same command, SLURM_RESTART_COUNT=1; it finishes two steps later.
    env["SLURM_RESTART_COUNT"] = "1"
    proc = subprocess.run(["bash", str(SBATCH), *run_overrides(tiny_model_dir, demo_shards, tmp_path, **common,
                                                               **{"optim.max_steps": step + 2})],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "attempt 2" in proc.stderr and f"at step {step}" in proc.stderr and "resumed from" in proc.stderr
    assert calls.read_text().splitlines().count("requeue 4242") == 1
    assert not (run / "PREEMPTED").exists()
    assert (run / "latest").read_text().strip() == f"step_{step + 2:08d}"
    steps = train_steps(run)
    assert steps[-2:] == [step + 1, step + 2]
