"""A real single-node Slurm (munged, slurmctld, slurmd) in a temporary folder, for the tests of the Slurm path.

Everything it runs is its own: its own munge key and socket, its own slurm.conf (`SLURM_CONF` points at it; pass
`cluster.env()` to sbatch, squeue, scontrol ...), its own ports, state, spool, log and pid files, all in one
temporary folder. The daemons run in the foreground as children in new sessions; `stop()` cancels the jobs it
ran, ends the daemons by process id (and their process groups), ends any left-over process of its own jobs (by
their `SLURM_CONF`) and removes the folder. Nothing else on the machine is touched.

Missing Slurm or munge is installed from the distribution (Debian/Ubuntu: `apt-get install slurmctld slurmd
slurm-client munge`) as root or with passwordless sudo; otherwise the `slurm_cluster` fixture skips, saying why.
The daemons run as the current user: root, or an ordinary user whose jobs then run as that user.

By hand: `python tests/slurm_cluster.py` starts one, prints the `export SLURM_CONF=...` line for another shell
(e.g. for `make slurm-demo`) and stops it on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def _missing() -> list[str]:
    return [n for n in DAEMONS + CLIENTS if _which(n) is None]


def ensure_installed(log=print) -> str | None:
    """None when Slurm and munge are ready to start, else the reason they are not (installs them as root)."""
    if not sys.platform.startswith("linux"):
        return f"a local Slurm needs Linux, not {sys.platform}"
    missing = _missing()
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm/munge not installed ({', '.join(missing)} missing) and no apt-get to install them"
    sudo = []
    if os.geteuid() != 0:
        ok = shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
        if not ok:
            return (f"Slurm/munge not installed ({', '.join(missing)} missing) and installing them needs root "
                    f"(or passwordless sudo): apt-get install {' '.join(PACKAGES)}")
        sudo = ["sudo", "-n", "DEBIAN_FRONTEND=noninteractive"]
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, "apt-get", "update", "-qq"],
                [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
    missing = _missing()
    if missing:
        return f"installed {' '.join(PACKAGES)}, yet {', '.join(missing)} still missing"
    log(f"slurm_cluster: installed {' '.join(PACKAGES)} in {time.monotonic() - start:.1f} s")
    return None



class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """One node (this machine, named as `hostname` says), one partition `debug`, accounting off."""

    def __init__(self, root: Path | None = None):
        # A short path of its own: a Unix socket path must stay under 108 bytes.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="vlora-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.jobs: list[str] = []  # every job submitted through self.sbatch
        self.node = ""
        self.cpus = 0
        self.start_seconds = 0.0

    # ---- environment and commands ----
    def env(self, **extra) -> dict:
        """os.environ for a client of this cluster: its SLURM_CONF, no SLURM_* of an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["PATH"] = os.pathsep.join([env.get("PATH", os.defpath), *SBIN])
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}\n{self.tail()}")
        return proc

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env()).stdout.strip()
        job = out.split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once Slurm has forgotten it."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return {}
        fields = {}
        for item in re.split(r" (?=[A-Za-z:/]+=)", proc.stdout.strip()):
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def queued(self, job_id: str) -> bool:
        """Pending, running, requeued... anything but gone: `squeue -h -j ID` prints a line."""
        proc = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def wait_job(self, job_id: str, timeout: float, until=None, what: str = "the job to end",
                 log: Path | None = None) -> dict[str, str]:
        """Polls until `until(job_fields)` holds (default: the job left the queue); returns the job's fields."""
        deadline = time.monotonic() + timeout
        while True:
            if until is None:
                if not self.queued(job_id):
                    return self.job(job_id)
            else:
                fields = self.job(job_id)
                if until(fields):
                    return fields
            if time.monotonic() > deadline:
                text = log.read_text()[-4000:] if log and log.is_file() else ""
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}: job {self.job(job_id)}\n"
                                 f"{text}\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 15) -> str:
        parts = []
        for name, path in self.logs.items():
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {name} log ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- start and stop ----
    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = self.root / "log" / f"{name}.out"
        self.logs[f"{name} stdout"] = log
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited ({p.returncode}) while waiting for {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")
            time.sleep(0.1)

    def _node_line(self) -> str:
        """This machine as `slurmd -C` sees it (the NodeName line only; NodeName must be `hostname`)."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        line = next((x for x in out.splitlines() if x.startswith("NodeName=")), None)
        if line is None:
            raise SlurmError(f"`slurmd -C` printed no NodeName line: {out!r}")
        self.node = line.split()[0].split("=", 1)[1]
        self.cpus = int(re.search(r"\bCPUs=(\d+)", line).group(1))
        return line

    def write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log", "run"):
            (r / sub).mkdir(mode=0o700, exist_ok=True)
        (r / "munge").chmod(0o755)  # clients of any user reach the socket (munged checks)
        user = pwd.getpwuid(os.geteuid()).pw_name  # root, or without root the daemons and jobs run as this user
        ctld_port = free_port()
        slurmd_port = next(p for p in iter(free_port, None) if p != ctld_port)
        conf = f"""\
# Written by tests/slurm_cluster.py: a throw-away single-node cluster.
ClusterName=vlora-test
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Test speed: requeued jobs held 6 s (cred_expire above, default 120), scheduling every 1-2 s (default 30-60); job
# records kept 5 minutes for `scontrol show job`. SIGKILL 30 s after a job's TERM (Slurm's default): on a loaded
# 2-core machine the training's save, torchrun, srun and the batch script's last words need more than 10 s.
KillWait=30
MinJobAge=300
# Job ids from a random start: launch/slurm.sbatch derives the rendezvous port from the job id, and two clusters
# on one machine (two test sessions) must not both number their jobs 1, 2, 3...
FirstJobId={random.randrange(1000, 1_000_000)}
{self._node_line()} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)
        (r / "plugstack.conf").write_text("")
        self.logs["slurmctld"] = r / "log" / "slurmctld.log"
        self.logs["slurmd"] = r / "log" / "slurmd.log"

    def start(self, timeout: float = 60) -> "SlurmCluster":
        began = time.monotonic()
        self.write_config()
        env = self.env()
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.logs["munged"] = m / "munged.log"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={m}/munge.socket.2",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"], env)
        self._wait("munged's socket", lambda: (m / "munge.socket.2").exists(), timeout)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)], env)
        self._wait("the node to be idle", self._idle, timeout)
        self.start_seconds = time.monotonic() - began
        return self

    def _idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10)
        return proc.returncode == 0 and proc.stdout.split() == ["idle"]

    def _own_leftovers(self) -> list[int]:
        """Processes of this cluster's jobs that outlived it: job processes and slurmstepd whose environment carries
        this cluster's SLURM_CONF (a client shell that merely exports it is left alone)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        skip = {os.getpid()}
        pid = os.getpid()
        while pid > 1:  # never this process or its ancestors
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
            skip.add(pid)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                if mine not in env:
                    continue
                # A job's process (SLURM_JOB_ID) or a step daemon, not a client that merely has SLURM_CONF set
                if any(v.startswith(b"SLURM_JOB_ID=") for v in env) or \
                        os.path.basename(os.readlink(entry / "exe")) == "slurmstepd":
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None and self.jobs:
            self.run("scancel", *self.jobs, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(self.queued(j) for j in self.jobs):
                time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # all three at once, then wait: a clean stop takes ~1-3 s
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)  # its own session and group: started with start_new_session
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for pid in self._own_leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


try:
    import pytest
except ImportError:  # `python tests/slurm_cluster.py` needs only the standard library
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def slurm_cluster(request):
        """One local cluster for every Slurm test of the session. Skips (with the reason) where Slurm cannot be
        installed or started; with VLORA_REQUIRE_SLURM=1 (CI) that fails instead."""
        report = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")

        def say(line: str) -> None:  # on the terminal, past pytest's capture: timings worth seeing
            if report is not None:
                with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                    report.write("\n")
                    report.write_line(line)

        def unavailable(reason: str):
            if os.environ.get("VLORA_REQUIRE_SLURM") == "1":
                pytest.fail(f"VLORA_REQUIRE_SLURM=1, but {reason}", pytrace=False)
            pytest.skip(reason)

        reason = ensure_installed(log=say)
        if reason:
            unavailable(reason)
        cluster = SlurmCluster()
        try:
            cluster.start()
        except (SlurmError, OSError, subprocess.SubprocessError) as e:
            cluster.stop()
            unavailable(f"a local Slurm did not start: {e}")
        say(f"slurm_cluster: node {cluster.node} ({cluster.cpus} CPUs) idle {cluster.start_seconds:.1f} s after "
            f"the start ({cluster.root})")
        began = time.monotonic()
        try:
            yield cluster
        finally:
            stopping = time.monotonic()
            cluster.stop()
            say(f"slurm_cluster: {len(cluster.jobs)} jobs in {stopping - began:.1f} s; stopped in "
                f"{time.monotonic() - stopping:.1f} s")


def main() -> int:
    reason = ensure_installed()
    if reason:
        print(f"slurm_cluster: {reason}", file=sys.stderr)
        return 1
    cluster = SlurmCluster()
    try:
        cluster.start()
        print(f"slurm_cluster: node {cluster.node} ({cluster.cpus} CPUs) idle after {cluster.start_seconds:.1f} s; "
              f"in another shell:\nexport SLURM_CONF={cluster.conf}\nCtrl-C stops it.", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # after the daemons started
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
