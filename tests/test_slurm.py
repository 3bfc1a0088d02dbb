"""launch/slurm.sbatch, submitted unchanged to a real single-node Slurm (tests/slurm_cluster.py): it trains,
a pre-empted job saves, requeues itself and ends with the uninterrupted run's losses, `scontrol requeue` loses
at most the steps since the last checkpoint, and `scancel` still cancels.

Every job is what a user on a CPU cluster would submit: `sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2
launch/slurm.sbatch key=value ...` from the repository root, GPUS_PER_NODE=2 (two training processes, gloo).
No RDZV_PORT is given: the script picks the rendezvous port from the job id and the restart count, as it does for a
user (the local cluster numbers its jobs from a random first id, so two test sessions on one machine differ)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import REPO, assert_same_run, run_overrides
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from vlora.checkpoint import is_complete

pytestmark = pytest.mark.slow

SBATCH = "launch/slurm.sbatch"
STEPS, SAVE_EVERY = 16, 2
# fp32 with LoRA dropout, so resuming must restore the RNG as well as the weights, optimizer and data position.
CONFIG = {"optim.max_steps": STEPS, "optim.global_batch": 8, "optim.micro_batch": 1, "lora.dropout": 0.1,
          "run.precision": "fp32", "optim.lr": 2e-3, "optim.warmup_steps": 1, "data.val": "", "run.log_every": 1,
          "run.save_every": SAVE_EVERY, "run.plot": "false", "data.num_workers": 1}
JOB_TIMEOUT = 300
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class Job:
    def __init__(self, cluster, job_id: str, run: Path, log: Path):
        self.cluster, self.id, self.run, self.log = cluster, job_id, run, log

    def text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def fields(self) -> dict:
        return self.cluster.job(self.id)

    def wait(self, until=None, what="the job to end", timeout=JOB_TIMEOUT) -> dict:
        return self.cluster.wait_job(self.id, timeout, until=until, what=what, log=self.log)

    def wait_steps(self, n: int) -> None:
        """Until n training steps are logged (by all attempts together)."""
        self.wait(lambda f: len(train_records(self.run)) >= n or f.get("JobState") not in ("PENDING", "RUNNING"),
                  f"training step {n}")
        assert self.fields().get("JobState") == "RUNNING", f"the job ended before step {n}:\n{self.text()[-4000:]}"

    def wait_requeued(self) -> int:
        """Until the job is back in the queue (its first attempt's processes all gone): the number of training
        records that attempt logged. It waits there for the credential lifetime (cred_expire, 5 s here)."""
        self.wait(lambda f: (f.get("Restarts"), f.get("JobState")) == ("1", "PENDING")
                  or f.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING"), "the requeue")
        return len(train_records(self.run))

    def assert_completed(self, restarts: int) -> dict:
        f = self.fields()
        assert (f.get("JobState"), f.get("ExitCode"), f.get("Restarts")) == ("COMPLETED", "0:0", str(restarts)), (
            f, self.text()[-6000:])
        return f


def submit(cluster, tiny_model_dir, demo_shards, tmp_path, name: str, *sbatch_args: str, env=None,
           **overrides) -> Job:
    log = tmp_path / f"{name}.out"
    job_env = cluster.env(GPUS_PER_NODE=2, SHUTDOWN_TIMEOUT=60, OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1, **(env or {}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "RDZV_PORT"):
        job_env.pop(var, None)
    args = run_overrides(tiny_model_dir, demo_shards, tmp_path, **{**CONFIG, "run.name": name, **overrides})
    job_id = cluster.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--job-name=vlora-{name}",
                            f"--output={log}", *sbatch_args, SBATCH, *args, cwd=REPO, env=job_env)
    return Job(cluster, job_id, tmp_path / name, log)


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def train_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "loss" in r]


def run_seconds(run_time: str) -> int:
    """`scontrol show job`'s RunTime ([D-]HH:MM:SS) in seconds."""
    days, _, hms = run_time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def resumed_at(text: str) -> int:
    found = re.findall(r"resumed from \S+ at step (\d+)", text)
    assert len(found) == 1, text[-6000:]
    return int(found[0])


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_model_dir, demo_shards, tmp_path_factory) -> Job:
    """The uninterrupted run, under Slurm: what every interrupted one must end up with."""
    job = submit(slurm_cluster, tiny_model_dir, demo_shards, tmp_path_factory.mktemp("slurm-reference"), "whole")
    job.wait()
    return job


def test_sbatch_trains_two_processes_and_writes_an_adapter(reference):
    reference.assert_completed(restarts=0)
    text = reference.text()
    assert "vlora: job " in text and "attempt 1, 1 node(s) x 2" in text
    assert "world 2 |" in text and "device cpu" in text
    assert [r["step"] for r in train_records(reference.run)] == list(range(1, STEPS + 1))
    assert (reference.run / "adapter" / "adapter_model.safetensors").is_file()
    assert (reference.run / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not (reference.run / "PREEMPTED").exists()
    assert "srun exited with status 0" in text


def test_preemption_warning_saves_requeues_and_resumes(slurm_cluster, reference, tiny_model_dir, demo_shards,
                                                       tmp_path):
    """The warning (USR1 to the batch shell, as --signal=B:USR1@N sends it) at step >= 3: the job saves, writes
    PREEMPTED, requeues itself, comes back with SLURM_RESTART_COUNT=1, resumes from that checkpoint and ends
    with the uninterrupted run's per-step losses and adapter."""
    job = submit(slurm_cluster, tiny_model_dir, demo_shards, tmp_path, "cut")
    job.wait_steps(3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    n = job.wait_requeued()
    job.wait()
    job.assert_completed(restarts=1)
    text = job.text()
    first, second = train_records(job.run)[:n], train_records(job.run)[n:]
    stopped = first[-1]["step"]
    assert 3 <= stopped < STEPS
    assert [r["step"] for r in first] == list(range(1, stopped + 1))  # nothing lost
    assert "vlora: USR1 at " in text and f"pre-empted (SIGUSR1) after step {stopped}" in text
    assert f"vlora: checkpoint at step {stopped}; requeueing job {job.id} to continue from it" in text
    assert "attempt 2, 1 node(s) x 2" in text  # attempt = SLURM_RESTART_COUNT + 1
    assert resumed_at(text) == stopped
    assert [r["step"] for r in second] == list(range(stopped + 1, STEPS + 1))
    assert not (job.run / "PREEMPTED").exists() and not (job.run / "REQUEUED").exists()  # done: nothing pending
    assert_same_run(job.run, reference.run, steps=STEPS, rtol=1e-6, atol=1e-6, grad_norms=False, mean_atol=None,
                    torn_ok=True)


@pytest.mark.parametrize("how", ["requeue", "kill-then-requeue"])
def test_scontrol_requeue_loses_at_most_the_steps_since_the_last_checkpoint(slurm_cluster, reference, tiny_model_dir,
                                                                           demo_shards, tmp_path, how):
    """`scontrol requeue` of a running job, no warning: Slurm sends TERM to every process of the job (SIGKILL
    after KillWait) and requeues it itself; the script does not requeue it again. The run resumes from its last
    checkpoint and completes with the uninterrupted run's losses. The TERM reaches the training too, which here
    always manages a pre-emption checkpoint; so the second case SIGKILLs the training step first (as a crash
    would): then the run goes back to its last run.save_every checkpoint."""
    job = submit(slurm_cluster, tiny_model_dir, demo_shards, tmp_path, how)
    job.wait_steps(3)
    if how == "kill-then-requeue":
        slurm_cluster.run("scancel", "--signal=KILL", f"{job.id}.0")  # step 0: torchrun and the training
    slurm_cluster.run("scontrol", "requeue", job.id)
    n = job.wait_requeued()
    job.wait()
    job.assert_completed(restarts=1)
    text = job.text()
    first, second = train_records(job.run)[:n], train_records(job.run)[n:]
    done_before = first[-1]["step"]
    resumed = resumed_at(text)
    assert resumed == second[0]["step"] - 1
    assert 0 <= done_before - resumed <= SAVE_EVERY, (done_before, resumed)
    if how == "kill-then-requeue":
        assert "pre-empted" not in text and resumed % SAVE_EVERY == 0
    else:
        assert resumed == done_before or resumed % SAVE_EVERY == 0
    assert "attempt 2, 1 node(s) x 2" in text
    assert f"requeueing job {job.id}" not in text  # Slurm requeued it; the script saw the job ending and left it
    assert_same_run(job.run, reference.run, steps=STEPS, rtol=1e-6, atol=1e-6, grad_norms=False, mean_atol=None,
                    torn_ok=True)
    print(f"{how}: {done_before} steps done, resumed at {resumed} "
          f"({'pre-emption checkpoint on TERM' if 'pre-empted' in text else 'periodic checkpoint'})")


def test_signal_at_start_up_requeues_and_scancel_still_cancels(slurm_cluster, tiny_model_dir, demo_shards,
                                                               tmp_path):
    """A warning while the training processes are still starting (no handler yet, so no checkpoint) still
    requeues the job; the requeued attempt failing before it trains (its shards are missing for a while) does not
    end the job but requeues it again; and a plain `scancel` of the attempt that then trains cancels the job for
    good, though its TERM makes the training save as a pre-emption would.

    The warning comes right after the script starts srun, which drops a signal that arrives while it launches the
    step: the script must hold it until srun can pass it on, or the training never hears of it and runs to the end.
    """
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards / "train", shards / "train")
    job = submit(slurm_cluster, tiny_model_dir, demo_shards, tmp_path, "early", **{"data.train": shards / "train"})
    job.wait(lambda f: "attempt 1," in job.text() or f.get("JobState") not in ("PENDING", "RUNNING"),
             "the launch")
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    (shards / "train").rename(shards / "hidden")  # the next attempt fails before its first step
    job.wait(lambda f: "attempt 2 failed before training" in job.text() or f.get("JobState") in ENDED or not f,
             "the second attempt to fail")
    (shards / "hidden").rename(shards / "train")
    assert train_records(job.run) == [], job.text()[-4000:]  # neither attempt trained: the USR1 stopped the first
    job.wait(lambda f: "attempt 3," in job.text() or f.get("JobState") in ENDED or not f, "the third attempt")
    text = job.text()
    assert job.fields().get("Restarts") == "2", (job.fields(), text[-4000:])
    first, second = text.split("attempt 2,")[0], text.split("attempt 2,")[1].split("attempt 3,")[0]
    assert "vlora: USR1 at " in first
    # torchrun or its workers die of the USR1 they have no handler for yet; or it came before srun started
    assert (re.search(rf"USR1 but no pre-emption checkpoint \(srun exited with status \d+\); requeueing job {job.id} ",
                      first) or f"stopped before the launch; requeueing job {job.id}" in first), text[-4000:]
    assert "srun exited with status 0" not in first
    assert str(shards / "train") in second and "does not exist" in second, text[-4000:]  # why it failed
    assert re.search(rf"attempt 2 failed before training \(srun exited with status \d+\); requeueing job {job.id} "
                     rf"to try again \(1 of \d+ ", second), text[-4000:]
    assert "attempt 3, 1 node(s) x 2" in text

    job.wait_steps(2)
    slurm_cluster.run("scancel", job.id)
    job.wait()
    f = job.fields()
    assert (f.get("JobState"), f.get("Restarts")) == ("CANCELLED", "2"), (f, job.text()[-4000:])
    text = job.text().split("attempt 3,")[1]
    assert "vlora: TERM at " in text
    assert f"not requeued: Slurm is ending job {job.id} itself" in text, text[-4000:]
    assert not (job.run / "adapter").exists()


def test_time_limit_warning_reaches_the_training(slurm_cluster, tiny_model_dir, demo_shards, tmp_path):
    """Slurm's own timer: `--signal=B:USR1@60` (the #SBATCH line's mechanism) sends USR1 to the batch script at one of
    slurmctld's periodic checks (every 30 s) once the time left is within the warning plus 30 s, well before the
    limit; the script passes it on and the training saves. The job starts with a long limit; once it has trained a
    step, the limit is cut to leave 61-120 s, so the warning comes while it trains, never during start-up.
    MAX_REQUEUES=0, so the job ends there instead of coming back."""
    job = submit(slurm_cluster, tiny_model_dir, demo_shards, tmp_path, "timer", "--time=30", "--signal=B:USR1@60",
                 env={"MAX_REQUEUES": 0}, **{"optim.max_steps": 100000, "run.save_every": 0})
    job.wait_steps(1)
    trained = train_records(job.run)[-1]["step"]
    elapsed = run_seconds(job.fields()["RunTime"])
    slurm_cluster.run("scontrol", "update", f"JobId={job.id}", f"TimeLimit={elapsed // 60 + 2}")
    f = job.wait(timeout=240)
    text = job.text()
    assert "vlora: USR1 at " in text, (f, text[-4000:])
    assert (f.get("JobState"), f.get("Restarts")) == ("FAILED", "0"), (f, text[-4000:])  # not TIMEOUT
    step = int((job.run / "PREEMPTED").read_text())  # MAX_REQUEUES=0: nothing comes back to remove it
    assert step >= trained and train_records(job.run)[-1]["step"] == step
    assert f"pre-empted (SIGUSR1) after step {step}" in text
    assert f"checkpoint at step {step}; not requeued: 0 restarts reached MAX_REQUEUES" in text
    assert (job.run / "latest").read_text().strip() == f"step_{step:08d}"
    assert is_complete(job.run / f"step_{step:08d}")
