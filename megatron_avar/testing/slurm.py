"""A real one-node Slurm cluster on localhost, for tests that submit the project's sbatch scripts.

    from megatron_avar.testing.slurm import LocalSlurm, ensure_slurm_installed

    ensure_slurm_installed()                      # Debian's slurmctld/slurmd/munge via apt if missing
    with LocalSlurm.start() as cluster:           # ~1 s to an idle node
        job = cluster.sbatch(["--nodes=1", "slurm/avar_sft_7b.sh"], env={"CONFIG": ...})
        cluster.wait(job, timeout_s=300)          # -> final state, e.g. "COMPLETED"

The recipe (measured on the 2-core CPU machines; Debian's Slurm 22.05):

* munged, slurmctld and slurmd run as children of this process, with their own munge key, socket,
  config, state and spool directories under a fresh /tmp/avar-slurm-* directory (short: the munge
  socket path must fit a unix socket name), and free TCP ports (several test
  sessions on one machine never share a cluster). Clients find it through ``SLURM_CONF`` (``cluster.env``).
* ``ProctrackType=proctrack/linuxproc``: the default cgroup tracking fails without a mounted freezer and
  the job then reports COMPLETED with exit 0 and no output at all.
* ``RealMemory`` is set below what slurmd detects (a larger value leaves the node drained).
* ``cred_expire=5`` and ``sched_interval=1``: a requeued job starts again in ~6 s instead of ~143 s.
* munged needs a root-owned key and every directory above its socket to be o+x (mktemp gives 0700).

Stopping cancels every job, waits for the queue to empty (job processes would outlive slurmd), stops
the daemons it started by PID and removes the scratch directory (``keep=True`` keeps it, for debugging).
:meth:`LocalSlurm.leftover_pids` finds any process left of the cluster (its environment names this
cluster's ``SLURM_CONF``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalSlurm", "SlurmUnavailable", "ensure_slurm_installed", "free_port", "APT_PACKAGES"]

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_DAEMONS = ("munged", "slurmctld", "slurmd")
# States after which a job runs no more (squeue / scontrol spelling).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, or apt failed); tests skip on it."""


def ensure_slurm_installed(timeout_s: float = 600) -> None:
    """Install Debian's Slurm and munge with apt when ``slurmctld`` is missing (needs root). One install at a time
    on a machine: test processes running side by side (pytest-xdist workers) wait for the first one's, instead of
    failing on apt's lock."""
    import fcntl

    if _slurm_installed():
        return
    with open(Path(tempfile.gettempdir()) / "avar-slurm-install.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not _slurm_installed():  # (another process may have installed it while this one waited)
            _apt_install(timeout_s)


def _slurm_installed() -> bool:
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"))


def _apt_install(timeout_s: float) -> None:
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root: run as root, or "
                               f"`apt-get install {' '.join(APT_PACKAGES)}` beforehand")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr[-2000:]}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice): a cluster's, or a test job's own servers'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(scratch: Path, ctld_port: int, slurmd_port: int) -> str:
    mem_mb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) // 1024 - 1024
    cpus = os.cpu_count() or 1
    node = (f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
            f"RealMemory={mem_mb} State=UNKNOWN")
    return f"""ClusterName=local
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={scratch}/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/spool
SlurmctldPidFile={scratch}/run/slurmctld.pid
SlurmdPidFile={scratch}/run/slurmd.pid
SlurmctldLogFile={scratch}/log/slurmctld.log
SlurmdLogFile={scratch}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{node}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running one-node cluster (see the module docstring). ``env``: the environment for client commands."""

    scratch: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, timeout_s: float = 30, keep: bool = False) -> Iterator[LocalSlurm]:
        """Start munged, slurmctld and slurmd in a fresh scratch directory; stop them all on exit."""
        scratch = Path(tempfile.mkdtemp(prefix="avar-slurm-"))
        scratch.chmod(0o711)  # munged: every directory above its socket must be o+x (mkdtemp gives 0700)
        for sub in ("munge", "etc", "state", "spool", "log", "run"):
            (scratch / sub).mkdir(mode=0o711)
        conf = scratch / "etc" / "slurm.conf"
        conf.write_text(_slurm_conf(scratch, free_port(), free_port()))
        cluster = cls(scratch=scratch, env={**os.environ, "SLURM_CONF": str(conf)})
        try:
            cluster._start_daemons(timeout_s)
            yield cluster
        finally:
            cluster.stop()
            if not keep:
                shutil.rmtree(scratch, ignore_errors=True)

    def _start_daemons(self, timeout_s: float) -> None:
        s = self.scratch
        subprocess.run(["mungekey", "-c", "-f", "-k", str(s / "munge/munge.key")], check=True, capture_output=True)
        self._spawn("munged", ["munged", "-F", f"--socket={s}/munge/munge.socket", f"--key-file={s}/munge/munge.key",
                               f"--pid-file={s}/run/munged.pid", f"--seed-file={s}/munge/munged.seed",
                               f"--log-file={s}/log/munged.log"])
        self._until(lambda: (s / "munge/munge.socket").is_socket(), 5, "munged made no socket")
        self._spawn("slurmctld", ["slurmctld", "-D"])
        self._spawn("slurmd", ["slurmd", "-D"])
        self._until(lambda: self.node_state() == "idle", timeout_s, "the node never became idle")

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.scratch / "log" / f"{name}.out", "wb")  # noqa: SIM115 (kept open by the child)
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            dead = [name for name, p in self.processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: {what} (exited: {dead or 'none'}); logs:\n{self.daemon_logs()}")
            time.sleep(0.1)

    def daemon_logs(self, tail_chars: int = 3000) -> str:
        logs = sorted((self.scratch / "log").glob("*"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail_chars:]}" for p in logs)

    # -- client commands ------------------------------------------------------------------------------
    def run(self, command: Sequence[str], *, check: bool = True, timeout_s: float = 30,
            env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def node_state(self) -> str:
        try:
            result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout_s=5)
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip()

    def sbatch(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None) -> str:
        """Submit (``sbatch --parsable *args``) with ``env`` added to the environment; returns the job id."""
        return self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once Slurm forgot the job."""
        result = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if result.returncode != 0:
            return {}
        fields = {}
        for token in result.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, *, timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Wait until the job is in a final state; returns its ``job`` fields. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s: {info}\n{self.daemon_logs()}")
            time.sleep(poll_s)

    # -- teardown -------------------------------------------------------------------------------------
    def leftover_pids(self) -> list[int]:
        """PIDs of processes whose environment names this cluster's SLURM_CONF: job scripts, steps, ranks
        (not the running daemons, their direct children such as slurmctld's slurmscriptd, or this process)."""
        marker = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        daemons = {p.pid for p in self.processes.values() if p.poll() is None}
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in daemons or int(proc.name) == os.getpid():
                continue
            try:
                parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
                if parent not in daemons and marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def stop(self, timeout_s: float = 20) -> None:
        """Cancel all jobs, wait for their processes to end, stop the daemons (TERM, then KILL)."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run(["scancel", f"--user={os.getuid()}"], check=False, timeout_s=10)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    queue = self.run(["squeue", "-h"], check=False, timeout_s=5).stdout.strip()
                    if not queue and not self.leftover_pids():
                        break
                    time.sleep(0.2)
        for name in reversed(_DAEMONS):  # slurmd, slurmctld, then munged (both need it to shut down)
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # slurmd ignores TERM while stuck retrying munge
                process.kill()
                process.wait(timeout=10)
