"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd started from a temp dir.

Debian's slurm-wlm and munge are installed with apt-get when missing (root only). Every daemon runs
in the foreground as our child, on free ports, with its own munge socket, state and logs under the
temp dir, so it does not touch (or collide with) a Slurm or munge the machine may already run.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the reason says why (tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def ensure_installed(timeout_s: float = 900.0) -> None:
    """apt-get install slurm-wlm munge when a daemon or client is missing (non-interactive)."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and installing it "
                               "needs root: run `apt-get install slurm-wlm munge` as root")
    if _which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]):
        try:
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took more than {timeout_s:.0f} s") from e
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    still = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if still:
        raise SlurmUnavailable(f"apt-get installed slurm-wlm and munge, but {still} are still missing")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _real_memory_mib() -> int:
    text = Path("/proc/meminfo").read_text()
    kib = int(re.search(r"^MemTotal:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return max(512, kib // 1024 - 1024)  # leave 1 GiB to the OS


def write_slurm_conf(root: Path, node: str, cpus: int, memory_mib: int, munge_socket: Path) -> Path:
    """sched_interval=2: a pending job whose begin time has passed (a requeued one released early)
    starts within 2 s; with the default 60 s it waited for the next pass, or for backfill's (30 s)."""
    ctld_port, slurmd_port = _free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=dtraintest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=30
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@dataclass
class SlurmCluster:
    """A running one-node cluster; `env` points the Slurm clients at it (SLURM_CONF)."""

    root: Path
    node: str
    cpus: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cmd(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_for(self, what: str, predicate, timeout: float, interval: float = 0.5):  # noqa: ANN001
        """Poll `predicate()` until it returns something truthy; fail with the daemons' logs if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def node_state(self) -> str:
        out = self.cmd("sinfo", "--noheader", "--nodes", self.node, "--format=%T", check=False)
        return out.strip()


def _start_munged(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    munge = pwd.getpwnam("munge")
    mdir = root / "munge"
    mdir.mkdir(mode=0o755)
    key = mdir / "munge.key"
    shutil.copyfile("/etc/munge/munge.key", key) if Path("/etc/munge/munge.key").exists() \
        else key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (mdir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = mdir / "munge.socket"
    log = open(root / "munged.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [_which("munged") or "munged", "--foreground", f"--socket={sock}", f"--key-file={key}",
         f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}",
         f"--log-file={root / 'munged.log'}", "--force"],
        user=munge.pw_uid, group=munge.pw_gid, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return proc, sock


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextmanager
def slurm_cluster(start_timeout: float = 60.0) -> Iterator[SlurmCluster]:
    """Install (if needed) and start munged, slurmctld, slurmd; cancel jobs and stop them all on exit.

    Its files live in a fresh /tmp dir readable by user munge (pytest's tmp dirs are private to root),
    removed at the end.
    """
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="dtrain-slurm-"))
    root.chmod(0o755)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    cluster = SlurmCluster(root=root, node=node, cpus=cpus, env={})
    try:
        munged, sock = _start_munged(root)
        cluster.procs["munged"] = munged
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        conf = write_slurm_conf(root, node, cpus, _real_memory_mib(), sock)
        cluster.env = {**os.environ, "SLURM_CONF": str(conf)}
        cluster.wait_for("the munge socket", lambda: sock.exists() or munged.poll() is not None, 15, 0.1)
        if munged.poll() is not None:
            raise SlurmUnavailable(f"munged exited {munged.returncode} at start\n{cluster.logs()}")
        for daemon in ("slurmctld", "slurmd"):
            # -D: stay in the foreground as our child; -f: our config; slurmctld -i ignores old state.
            extra = ["-i"] if daemon == "slurmctld" else []
            cluster.procs[daemon] = subprocess.Popen(
                [_which(daemon) or daemon, "-D", "-f", str(conf), *extra], env=cluster.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(root / f"{daemon}.err", "wb"))
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited {proc.returncode} at start\n{cluster.logs()}")
        cluster.wait_for(f"node {node} to be idle",
                         lambda: cluster.node_state().startswith("idle"), start_timeout)
        yield cluster
    finally:
        if "slurmctld" in cluster.procs and cluster.env:
            with suppress(Exception):
                cluster.cmd("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False)
                cluster.wait_for("jobs to end", lambda: not cluster.cmd("squeue", "--noheader", check=False).strip(),
                                 60)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        shutil.rmtree(root, ignore_errors=True)
