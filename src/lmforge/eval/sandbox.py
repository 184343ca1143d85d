"""Run untrusted Python (model-written code) in a child process under limits; say how it ended.

Built for scoring code benchmarks: the threat is wrong or sloppy code (endless loops, huge
allocations, fork loops, stray writes, network calls), not an attacker aiming at the sandbox.
For code that must not be trusted at all, run the whole evaluation in a throwaway VM or container.

What holds on Linux, and how (`SandboxResult.isolation` names what took effect on each run):

- Limits, kernel-enforced on the program: RLIMIT_CPU, RLIMIT_AS (address space),
  RLIMIT_FSIZE (stdout and stderr included), RLIMIT_NOFILE, RLIMIT_CORE=0. They apply per
  process, so memory in all is up to max_processes * memory_bytes. The wall clock is kept by
  the caller, which SIGKILLs the child's whole process group when it runs out.
- Processes: a pids cgroup caps the task count where the caller may create one ("pids-cgroup":
  root with a writable cgroup v1 `pids` or delegated v2 hierarchy); otherwise RLIMIT_NPROC
  ("nproc-rlimit"), which counts all of the user's tasks, so it is set to their current number
  plus `max_processes`; Linux ignores it for root, so a program left running as root without a
  cgroup gets "fork-guard": os.fork, exec and subprocess are disabled in Python instead.
- User: a caller running as root runs the program as a user of the run's own, with no account
  and no rights ("unprivileged-user": uid and gid 2^30 + the child's pid), inside the user
  namespace or without one, wherever such a user can reach the interpreter, its import path
  and the working directory (not so for a Python under /root: there the program stays root).
  The kernel then keeps it from writing anything but its working directory and world-writable
  places, from reading other processes' environments (/proc/PID/environ), where tokens tend to
  live, and from signalling another run's processes; RLIMIT_NPROC counts its tasks alone.
- Cleanup: the program runs in new user, PID and network namespaces where the kernel allows
  ("user-namespace", "pid-namespace", "net-namespace"; unprivileged where user namespaces are
  enabled). Its namespace's init is ours; when the program ends or the wall clock runs out the
  init exits or is killed, and the kernel kills every process left in the namespace, including
  ones that left the process group. Without namespaces, killing the process group (and the
  cgroup, if any) is all there is: a process that calls setsid() can outlive the run.
- Network: in the new network namespace only a loopback that is down exists, and inside a new
  user namespace the program holds no capabilities in the host's namespaces, so it cannot
  switch back (root without a user namespace could). Without namespaces, "socket-guard" makes
  Python refuse every non-AF_UNIX socket; code can undo that (ctypes).
- Files, Python-level ("write-guard"): open/os/pathlib/shutil writes outside the fresh
  working directory raise PermissionError. Code that goes around Python (subprocess, ctypes,
  _io.FileIO) writes wherever its user may: the caller's user, or the run's own (above).
- Secrets: with a user namespace or as the run's own user, the program cannot read the
  environments of the caller's processes; running as the caller's user without either (a
  Python under /root where user namespaces are refused, or an unprivileged caller without
  them), it can.

The child is sandbox_child.py run as `python -I -B sandbox_child.py CONFIG REPORT_FD` (isolated
mode, a minimal environment, stdin from /dev/null). It reports on a pipe the program never
holds, so the program cannot forge a result.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lmforge.eval.sandbox_child import PROGRAM

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "killed"]

_USE_NAMESPACES = True
"""Try user + PID + network namespaces (tests switch this off to exercise the fallbacks)."""
_USE_CGROUPS = True
"""Try a pids cgroup as the process cap (tests switch this off to exercise the fallbacks)."""
_CGROUP_V1_PIDS = Path("/sys/fs/cgroup/pids")
_CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_PYTHON = sys.executable
"""The interpreter that runs the child and the program (tests point it at another one)."""


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    cpu_seconds: int = 5
    """CPU time of each process (RLIMIT_CPU); past it the process dies of SIGXCPU (a timeout)."""
    wall_seconds: float = 6.0
    """Wall-clock time from launch (Python startup included); then every process is killed."""
    memory_bytes: int = 2 * 2**30
    """Address space of each process (RLIMIT_AS); bigger allocations raise MemoryError."""
    file_size_bytes: int = 16 * 2**20
    """Largest file any process may write (RLIMIT_FSIZE), stdout and stderr included."""
    max_processes: int = 32
    """Tasks (processes and threads) the program may have at once, itself included."""
    max_open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 8192
    """Bytes of stdout and of stderr kept in the result; the rest is dropped."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"sandbox.{name} must be > 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class SandboxResult:
    status: Status
    """passed: exit 0; failed: nonzero exit; timeout: wall clock or CPU limit; killed: a signal."""
    exit_code: int | None
    """Exit code, or minus the signal that ended the program; None when we had to kill it."""
    stdout: str
    """The first max_output_bytes of the program's stdout (UTF-8, undecodable bytes replaced)."""
    stderr: str
    """The first max_output_bytes of its stderr: tracebacks end up here."""
    duration_s: float
    """Wall-clock seconds from launch to the end of cleanup."""
    isolation: tuple[str, ...]
    """Containment that took effect, e.g. ("pids-cgroup", "net-namespace", "write-guard")."""


def run_sandboxed(program: str, limits: SandboxLimits) -> SandboxResult:
    """Run program (Python source) as __main__ in a fresh temporary directory; how it ended.

    Safe to call from many threads at once (no preexec_fn; every run has its own directory,
    process group and cgroup). Raises RuntimeError only if the sandbox itself failed to start.
    """
    if sys.platform != "linux":
        raise RuntimeError("run_sandboxed: Linux only (rlimits, namespaces and /proc)")
    start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    cgroup = None
    try:
        if _USE_CGROUPS:
            cgroup = _make_pids_cgroup(limits.max_processes + 2)  # + our init and its parent
        (workdir / PROGRAM).write_text(program, encoding="utf-8")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            returncode, ended, report = _launch(workdir, cgroup, limits, out, err)
            stdout = _head(out, limits.max_output_bytes)
            stderr = _head(err, limits.max_output_bytes)
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        _remove_tree(workdir)
    if ended and not report.get("ready"):
        raise RuntimeError(
            f"run_sandboxed: the sandbox failed to start (exit {returncode}):\n{stderr}"
        )
    status, exit_code = _outcome(ended, returncode, report)
    return SandboxResult(
        status=status,
        exit_code=exit_code,
        stdout=stdout,
        stderr=stderr,
        duration_s=time.monotonic() - start,
        isolation=tuple(report.get("isolation", ())),
    )


def _launch(
    workdir: Path, cgroup: Path | None, limits: SandboxLimits, out: IO[bytes], err: IO[bytes]
) -> tuple[int, bool, dict[str, Any]]:
    """Start the child, wait up to the wall limit, kill its group: (returncode, ended, report)."""
    config = {"limits": asdict(limits), "cgroup": cgroup and str(cgroup), "ns": _USE_NAMESPACES}
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [_PYTHON, "-I", "-B", _CHILD, json.dumps(config), str(write_fd)],
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        try:
            ended = _wait_exit(proc.pid, limits.wall_seconds)
        finally:
            _kill_group(proc.pid)  # before reaping: until then the group id cannot be reused
            proc.wait()
        return proc.returncode, ended, _read_report(read_fd)
    finally:
        os.close(read_fd)


def _child_env(workdir: Path) -> dict[str, str]:
    home = str(workdir)
    path = "/usr/local/bin:/usr/bin:/bin"
    return {"PATH": path, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once pid has ended (left unreaped), False if timeout seconds pass first."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # kernel < 5.3 or a seccomp filter: poll instead
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_report(fd: int) -> dict[str, Any]:
    """The JSON lines the child's trusted side wrote, merged (the pipe is closed by now)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    report: dict[str, Any] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        report.update(json.loads(line))
    return report


def _outcome(ended: bool, returncode: int, report: dict[str, Any]) -> tuple[Status, int | None]:
    if not ended:
        return "timeout", None
    if "wait_status" in report:
        code = os.waitstatus_to_exitcode(report["wait_status"])
    elif "pid-namespace" in report.get("isolation", ()):
        return "killed", None  # the namespace's init died before it could report
    else:
        code = returncode
    if code == 0:
        return "passed", 0
    if code > 0:
        return "failed", code
    return ("timeout" if code == -signal.SIGXCPU else "killed"), code


def _head(file: IO[bytes], limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode("utf-8", errors="replace")


def _remove_tree(path: Path) -> None:
    """Remove the working directory even if the program took away its own permissions or
    nested folders deeper than Python's recursion limit (rmtree and os.walk recurse); a
    directory that stays is a warning, never an error that ends the evaluation."""
    try:
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            for root, dirs, _ in os.walk(path):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o700)
            shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["chmod", "-R", "u+rwx", str(path)], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(path)], capture_output=True, check=False)
    if path.exists():
        log.warning("%s: could not remove the sandbox's working directory", path)


def _pids_cgroup_parents() -> list[Path]:
    """Our own cgroup in each hierarchy that has (v1) or may have (v2) the pids controller."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    parents = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):
            roots: tuple[Path, ...] = (_CGROUP_V1_PIDS,)
        else:
            roots = _CGROUP_V2_ROOTS if controllers == "" else ()
        for root in roots:
            parent = root / rel.lstrip("/")
            if (parent / "cgroup.procs").is_file():  # a cgroup, not a plain directory
                parents.append(parent)
    return parents


def _make_pids_cgroup(max_tasks: int) -> Path | None:
    """A fresh cgroup whose pids.max is max_tasks, or None where we may not make one."""
    for parent in _pids_cgroup_parents():
        path = parent / f"lmforge-sandbox-{uuid.uuid4().hex[:16]}"
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            if (path / "pids.max").is_file():
                (path / "pids.max").write_text(f"{max_tasks}\n")
                return path
        except OSError:
            pass
        path.rmdir()
    return None


def _remove_cgroup(path: Path) -> None:
    """Kill whatever is still in the cgroup (even setsid() escapees), then remove it."""
    for _ in range(500):
        try:
            pids = [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            try:
                path.rmdir()
                return
            except OSError:  # EBUSY until the last killed tasks are released
                pass
        time.sleep(0.01)
    log.warning("%s: could not remove the sandbox's cgroup; tasks may be left in it", path)
