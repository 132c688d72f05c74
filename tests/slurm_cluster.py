"""A real single-node SLURM cluster (munged + slurmctld + slurmd) started inside this machine for the tests.

Controller and compute node in one; munge key, ``slurm.conf``, state, spool, logs and the munge socket all live
under one state directory, and the daemons listen on free TCP ports, so the cluster coexists with any other on
the machine. Needs root: the daemons run as ``SlurmUser=root`` and the Debian packages are installed with
``apt-get`` when missing. Written against SLURM 22.05 (Debian bookworm); the behaviour the settings rely on is
noted beside them.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

# executable -> the Debian package that provides it
PACKAGES = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
# job states a job does not leave (a requeued or preempted job passes through PENDING, not these)
FAILED_STATES = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                           "DEADLINE"})
SBIN = ("/usr/sbin", "/sbin")
KEY = re.compile(r"[A-Za-z][\w:/]*")  # a field name of `scontrol show job -o`: JobState, CPUs/Task, ReqB:S:C:T


def die_with_parent() -> None:
    """Run in a daemon before exec: SIGTERM it when the test process dies without stop() (killed, crashed),
    so that no cluster outlives its session. Linux PR_SET_PDEATHSIG; the process that starts the cluster must
    outlive its thread that did (pytest's main thread does)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class SlurmUnavailable(RuntimeError):
    """The cluster cannot start on this machine; the reason says why (tests skip with it)."""


class JobStateError(AssertionError):
    """A job failed, or did not reach the awaited state in time; the message has its ``scontrol`` record."""


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nobody listens on now (the kernel's choice; held together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """One private cluster: ``start()`` it, point clients at it with ``env``, ``stop()`` it."""

    def __init__(self):
        self.state_dir: Path | None = None
        self.env: dict[str, str] = {}
        self.node = socket.gethostname().split(".")[0]
        self.cpus = 0
        self.gpus = 0
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ life cycle
    def start(self, state_dir, gpus: int = 2, cred_expire: int = 10, kill_wait: int = 30, grace_s: int = 20,
              timeout: float = 60.0) -> LocalSlurm:
        """Install what is missing, configure, start the three daemons and wait until the node is idle.

        ``cred_expire``: a requeued job is held ``cred_expire + 1`` s before it may start again (SLURM's default
        120 s is too long for tests). ``kill_wait``: SIGTERM -> SIGKILL of a cancelled/requeued job.
        ``grace_s``: how long a preempted ``debug`` job has between its ``--signal`` and SIGTERM.
        Raises SlurmUnavailable, after stopping whatever it started, when the cluster cannot come up.
        """
        if os.geteuid() != 0:
            raise SlurmUnavailable("needs root: the daemons run as SlurmUser=root and packages come from apt-get")
        self.state_dir = Path(state_dir).resolve()
        if len(str(self.state_dir / "munge" / "munge.socket")) > 100:
            raise SlurmUnavailable(f"state directory {self.state_dir} too long for a unix socket path")
        for sub in ("munge", "ctld", "spool", "log", "run", "dev"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        path = os.environ.get("PATH", "")
        path += "".join(os.pathsep + d for d in SBIN if d not in path.split(os.pathsep))
        self.env = {"SLURM_CONF": str(self.state_dir / "slurm.conf"), "PATH": path}
        self._install_packages()
        try:
            self._configure(gpus, cred_expire, kill_wait, grace_s)
            self._start_munged()
            self._spawn("slurmctld", "-D", "-c", "-f", self.env["SLURM_CONF"])  # -c: start with an empty queue
            self._spawn("slurmd", "-D", "-N", self.node, "-f", self.env["SLURM_CONF"])
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged (TERM, then KILL). Safe to call twice."""
        if not self._procs:
            return
        if self._alive("slurmctld"):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30  # slurmd signals the steps; wait for them to go
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    # ------------------------------------------------------------------ jobs
    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command (``sbatch``, ``scontrol``, ...) against this cluster; ``check`` raises with its stderr."""
        proc = subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (``sbatch`` options and script or ``--wrap``); its job id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, Reason, ExitCode, ...); a value that holds
        spaces (Command, WorkDir) keeps them."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()
        info: dict[str, str] = {}
        key = None
        for token in line.split(" "):
            name, sep, value = token.partition("=")
            if sep and KEY.fullmatch(name):
                key, info[name] = name, value
            elif key is not None:
                info[key] += " " + token
        return info

    def wait_for(self, job_id: str, states=("COMPLETED",), timeout: float = 60.0) -> dict[str, str]:
        """Poll the job until its state is one of ``states``; its record. Raises JobStateError, with the record
        and the tail of slurmctld.log, when it reaches a failure state not awaited or ``timeout`` passes."""
        failures = FAILED_STATES - set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in failures or time.monotonic() > deadline:
                what = f"ended {state}" if state in failures else f"still {state} after {timeout:.0f} s"
                raise JobStateError(f"job {job_id} {what} (awaited {'/'.join(states)}):\n"
                                    + "\n".join(f"  {k}={v}" for k, v in info.items())
                                    + f"\n--- slurmctld.log:\n{tail(self.state_dir / 'log' / 'slurmctld.log')}")
            time.sleep(0.5)

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue``: SIGTERM to the job's processes, back to PENDING, held ``cred_expire + 1`` s."""
        self.run("scontrol", "requeue", str(job_id))

    def preempt(self, partition: str = "debug-high", cpus: int | None = None, gpus: int | None = None,
                seconds: int = 5) -> str:
        """Submit a ``sleep`` job to the high-priority partition that takes ``cpus`` (default all) and ``gpus``
        (default all) of the node, so that it preempts the running ``debug`` jobs; its id."""
        cpus = self.cpus if cpus is None else cpus
        gpus = self.gpus if gpus is None else gpus
        return self.sbatch("-p", partition, "-c", str(cpus), *([f"--gres=gpu:{gpus}"] if gpus else []),
                           "-o", "/dev/null", "--wrap", f"sleep {seconds}")

    def cancel(self, job_id: str) -> None:
        """``scancel``: SIGTERM to the job's processes, SIGKILL ``kill_wait`` later."""
        self.run("scancel", str(job_id))

    # ------------------------------------------------------------------ start-up steps
    def _which(self, name: str) -> str | None:
        return shutil.which(name, path=self.env["PATH"])

    def _install_packages(self) -> None:
        """``apt-get install`` the packages whose executables are missing (``apt-get update`` first if that fails)."""
        missing = [pkg for exe, pkg in PACKAGES.items() if not self._which(exe)]
        if not missing:
            return
        if not shutil.which("apt-get"):
            raise SlurmUnavailable(f"missing packages {' '.join(missing)} and no apt-get to install them")
        log = self.state_dir / "apt.log"
        with open(log, "w") as out:
            def apt(*args: str) -> bool:
                return subprocess.run(["apt-get", *args], stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode == 0

            install = ("install", "-y", "--no-install-recommends", *missing)
            if not apt(*install) and not (apt("update") and apt(*install)):
                raise SlurmUnavailable(f"apt-get install {' '.join(missing)} failed:\n{tail(log)}")

    def _configure(self, gpus: int, cred_expire: int, kill_wait: int, grace_s: int) -> None:
        """Write munge.key, slurm.conf, gres.conf and cgroup.conf for one node with what slurmd measures."""
        state = self.state_dir
        key = state / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # munged refuses a key or socket directory that others may write to
        for d in (state, state / "munge"):
            d.chmod(0o755)

        # declare what slurmd sees: a node larger than it is would be drained
        measured = subprocess.run([self._which("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
        fields = dict(t.split("=", 1) for t in measured.stdout.split() if "=" in t)
        if "CPUs" not in fields:
            raise SlurmUnavailable(f"slurmd -C gave no CPUs: {measured.stdout}{measured.stderr}")
        self.cpus = int(fields["CPUs"])
        memory = int(fields["RealMemory"]) * 85 // 100  # headroom: more than slurmd measures drains the node

        # slurmd 22.05 drops a GPU without File= ("Removing file-less GPU"): a dummy device file per fake GPU,
        # a character device like /dev/null where mknod works, else a plain file (slurmd counts it all the same)
        self.gpus = gpus
        gres = ""
        if gpus:
            for i in range(gpus):
                dev = state / "dev" / f"nvidia{i}"
                if not dev.exists():
                    try:
                        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
                    except OSError:
                        dev.touch()
            gres = f" Gres=gpu:{gpus}"
        (state / "gres.conf").write_text(f"Name=gpu File={state}/dev/nvidia[0-{gpus - 1}]\n" if gpus else "")
        (state / "cgroup.conf").write_text("# unused: proctrack/linuxproc, task/none\n")

        ctld_port, d_port = free_ports(2)
        conf = f"""\
# written by tests/slurm_cluster.py: one node, controller and compute on {self.node}
ClusterName=local
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held (+1 s) before it may start again
AuthInfo=socket={state}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd or cgroups in a container: processes tracked by parent pid, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# a job that asks for no memory gets its CPUs' share, not the whole node (SLURM's default): jobs can share the node
DefMemPerCPU={memory // self.cpus}
{"GresTypes=gpu" if gpus else ""}
JobRequeue=1
# a debug-high job requeues the debug jobs it needs room from; they get their --signal at once
# (preempt_send_user_signal), SIGTERM after GraceTime, SIGKILL KillWait later
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
MessageTimeout=10
KillWait={kill_wait}
MinJobAge=600
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory}{gres} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO \
GraceTime={grace_s}
PartitionName=debug-high Nodes={self.node} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=NO
"""
        Path(self.env["SLURM_CONF"]).write_text(conf)

    def _spawn(self, name: str, *args: str) -> None:
        """Start a daemon in the foreground (its pid is ours to stop); its early errors go to log/NAME.out."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **self.env}
        with open(self.state_dir / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen([self._which(name), *args], stdin=subprocess.DEVNULL, stdout=out,
                                                 stderr=subprocess.STDOUT, preexec_fn=die_with_parent, env=env)

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _died(self, name: str) -> SlurmUnavailable:
        """The daemon's exit, with its stderr (in the foreground it has all its log, and what came before it)."""
        out = self.state_dir / "log" / f"{name}.out"
        return SlurmUnavailable(f"{name} exited {self._procs[name].returncode}:\n{tail(out)}")

    def _start_munged(self) -> None:
        """munged on a socket of our own, checked by a credential round trip."""
        sock = self.state_dir / "munge" / "munge.socket"
        for stale in (sock, sock.with_name("munge.socket.lock")):
            stale.unlink(missing_ok=True)
        munge = self.state_dir / "munge"
        self._spawn("munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={munge}/munge.key",
                    f"--seed-file={munge}/munge.seed", f"--pid-file={self.state_dir}/run/munged.pid",
                    f"--log-file={self.state_dir}/log/munged.log")
        deadline = time.monotonic() + 10
        while not sock.is_socket():
            if not self._alive("munged"):
                raise self._died("munged")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged made no socket in 10 s:\n{tail(self.state_dir / 'log/munged.log')}")
            time.sleep(0.05)
        cred = subprocess.run([self._which("munge"), "-n", "-S", str(sock)], capture_output=True, timeout=10)
        check = subprocess.run([self._which("unmunge"), "-S", str(sock)], input=cred.stdout, capture_output=True,
                               timeout=10)
        if cred.returncode or check.returncode:
            raise SlurmUnavailable(f"munge round trip failed: {cred.stderr.decode()}{check.stderr.decode()}")

    def _wait_until_idle(self, timeout: float) -> None:
        """Poll ``sinfo`` until the node takes jobs; resume it if it comes up down or drained."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if not self._alive(name):
                    raise self._died(name)
            state = self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return
            if state.startswith(("down", "drain", "drng")):
                self.run("scontrol", "update", f"nodename={self.node}", "state=resume", check=False)
            elif state.startswith("inval"):
                reason = self.run("scontrol", "show", "node", self.node, check=False).stdout
                raise SlurmUnavailable(f"node {self.node} is INVALID: {reason}")
            time.sleep(0.2)
        raise SlurmUnavailable(f"node {self.node} is {state or 'not reported'} after {timeout:.0f} s:\n"
                               f"{tail(self.state_dir / 'log' / 'slurmd.log')}")
