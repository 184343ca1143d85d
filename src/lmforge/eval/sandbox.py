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
  plus `max_processes`; Linux ignores it for root, so root without a cgroup gets "fork-guard":
  os.fork, exec and subprocess are disabled in Python instead.
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
- Files, Python-level only ("write-guard"): open/os/pathlib/shutil writes outside the fresh
  working directory raise PermissionError. Code that goes around Python (subprocess, ctypes,
  _io.FileIO) writes wherever its user may; the program runs as the caller's user, so under
  root that is almost anywhere.

The child is this file run as `python -I -B sandbox.py CONFIG REPORT_FD` (isolated mode, a
minimal environment, stdin from /dev/null); the functions below the "child side" banner are that
program. It reports on a pipe the program never holds, so the program cannot forge a result.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal, NoReturn

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "killed"]

_USE_NAMESPACES = True
"""Try user + PID + network namespaces (tests switch this off to exercise the fallbacks)."""
_USE_CGROUPS = True
"""Try a pids cgroup as the process cap (tests switch this off to exercise the fallbacks)."""
_CGROUP_V1_PIDS = Path("/sys/fs/cgroup/pids")
_CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_PROGRAM = "program.py"
_SCRIPT = os.path.abspath(__file__)


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
        (workdir / _PROGRAM).write_text(program, encoding="utf-8")
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
                [sys.executable, "-I", "-B", _SCRIPT, json.dumps(config), str(write_fd)],
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
    """Remove the working directory even if the program took away its own permissions."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)
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


# --- child side: `python -I -B sandbox.py CONFIG REPORT_FD` runs what follows ------------------


def _child_main(config: dict[str, Any], report_fd: int) -> NoReturn:
    """Set up containment, then run the program: directly, or under our init in new namespaces."""
    limits = config["limits"]
    isolation: list[str] = []
    nproc = None
    if config["cgroup"] and _join_cgroup(config["cgroup"]):
        isolation.append("pids-cgroup")
    elif os.geteuid() != 0:
        nproc = _user_tasks(os.getuid()) + limits["max_processes"]
        isolation.append("nproc-rlimit")
    else:
        isolation.append("fork-guard")  # Linux ignores RLIMIT_NPROC for root
    namespaced = config["ns"] and _enter_namespaces(isolation)
    isolation += ["write-guard"] if namespaced else ["write-guard", "socket-guard"]
    _report(report_fd, isolation=isolation)
    if not namespaced:
        if "pids-cgroup" in isolation:  # no init of ours in the cgroup: give the program its two
            _write(os.path.join(config["cgroup"], "pids.max"), str(limits["max_processes"]))
        _run_program(limits, nproc, isolation, report_fd)
    init = os.fork()  # pid 1 of the new PID namespace
    if init == 0:
        program = os.fork()
        if program == 0:
            _run_program(limits, nproc, isolation, report_fd)
        _report(report_fd, wait_status=_reap_until(program))
        os._exit(0)  # the kernel now kills every process left in the namespace
    os.close(report_fd)
    os.waitpid(init, 0)
    os._exit(0)  # skip interpreter teardown: ~25 ms per run


def _report(fd: int, **fields: Any) -> None:
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _join_cgroup(path: str) -> bool:
    try:
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
        return True
    except OSError:
        return False


def _user_tasks(uid: int) -> int:
    """Tasks (threads) of uid's processes: the number RLIMIT_NPROC compares against."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _unshare(flags: int) -> bool:
    import ctypes

    return bool(ctypes.CDLL(None, use_errno=True).unshare(flags) == 0)


def _enter_namespaces(isolation: list[str]) -> bool:
    """New user + PID + network namespaces (for root, PID + network if user ones are refused).

    A process cannot map root into its own new user namespace (Linux >= 5.12 wants CAP_SETFCAP
    in the parent namespace), so a helper forked beforehand, still outside, writes the maps.
    """
    uid, gid = os.getuid(), os.getgid()
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        target, code = os.getppid(), 0
        if os.read(go_r, 1) == b"1":
            try:
                _write(f"/proc/{target}/setgroups", "deny")
                _write(f"/proc/{target}/uid_map", f"{uid} {uid} 1")
                _write(f"/proc/{target}/gid_map", f"{gid} {gid} 1")
            except OSError as e:
                print(f"sandbox: mapping ids into the user namespace failed: {e}", file=sys.stderr)
                code = 1
        os._exit(code)
    os.close(go_r)
    entered = _unshare(_CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNET)
    os.write(go_w, b"1" if entered else b"0")
    os.close(go_w)
    if os.waitpid(helper, 0)[1] != 0:
        raise RuntimeError("sandbox: could not map ids into the new user namespace")
    if entered:
        isolation += ["user-namespace", "pid-namespace", "net-namespace"]
        return True
    if os.geteuid() == 0 and _unshare(_CLONE_NEWPID | _CLONE_NEWNET):
        isolation += ["pid-namespace", "net-namespace"]  # root keeps its capabilities here
        return True
    return False


def _reap_until(pid: int) -> int:
    """As init, reap every orphan until pid ends; its wait status."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return status


def _run_program(
    limits: dict[str, int], nproc: int | None, isolation: list[str], report_fd: int
) -> NoReturn:
    """In the process that becomes the program: guards, limits, then the program itself."""
    try:
        _guard_writes(os.getcwd())
        if "socket-guard" in isolation:
            _guard_network()
        if "fork-guard" in isolation:
            _guard_processes()
        _apply_limits(limits, nproc)
        _report(report_fd, ready=True)
        os.close(report_fd)
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # not "ready": the caller raises instead of scoring a failure
    code = _execute(_PROGRAM)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # e.g. stdout past RLIMIT_FSIZE; nothing more to say
            pass
    os._exit(code)


def _apply_limits(limits: dict[str, int], nproc: int | None) -> None:
    cpu = limits["cpu_seconds"]
    caps = [
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU, then SIGKILL a second later
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_bytes"], limits["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
    ]
    if nproc is not None:
        caps.append((resource.RLIMIT_NPROC, nproc, nproc))
    for which, soft, hard in caps:
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:  # an unprivileged user cannot raise it
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


_PATH_WRITERS = {
    **dict.fromkeys(["remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown"], 1),
    **dict.fromkeys(["truncate", "utime", "mkfifo", "mknod"], 1),
    **dict.fromkeys(["rename", "replace", "link", "symlink"], 2),
}
"""os functions that change the file system, and how many leading arguments are paths."""


def _guard_writes(workdir: str) -> None:
    """Python-level writes outside workdir raise PermissionError (defense in depth, no more)."""
    import builtins
    import io

    root = os.path.realpath(workdir)

    def check(path: Any, dir_fd: int | None = None) -> None:
        if isinstance(path, int):
            return  # an open descriptor: judged when it was opened
        name = os.fsdecode(path)
        base = os.getcwd() if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}")
        real = os.path.realpath(os.path.join(base, name))
        if real != os.devnull and os.path.commonpath([root, real]) != root:
            raise PermissionError(errno.EACCES, "sandbox: no writing outside the working dir", name)

    real_open = builtins.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    setattr(builtins, "open", guarded_open)  # noqa: B010 (mypy rejects assigning a function)
    setattr(io, "open", guarded_open)  # noqa: B010
    setattr(os, "open", guarded_os_open)  # noqa: B010
    for name, count in _PATH_WRITERS.items():
        if hasattr(os, name):
            setattr(os, name, _checking_paths(getattr(os, name), count, check))


def _checking_paths(
    real: Callable[..., Any], count: int, check: Callable[[Any, int | None], None]
) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        named = [kwargs[key] for key in ("path", "src", "dst") if key in kwargs]
        for path in [*args[:count], *named]:
            check(path, kwargs.get("dir_fd"))
        return real(*args, **kwargs)

    return guarded


def _guard_network() -> None:
    """Refuse every socket but AF_UNIX (used without a network namespace; code can undo it)."""
    import socket

    class NoNetworkSocket(socket.socket):
        def __init__(self, family: Any = -1, type: Any = -1, proto: int = -1, fileno: Any = None):
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError(errno.EACCES, "sandbox: network access is disabled")
            super().__init__(family, type, proto, fileno)

    setattr(socket, "socket", NoNetworkSocket)  # noqa: B010


def _guard_processes() -> None:
    """Without any kernel cap on processes (root, no cgroup), refuse to start them in Python."""
    import _posixsubprocess

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise PermissionError(errno.EACCES, "sandbox: no new processes (no process limit here)")

    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    setattr(_posixsubprocess, "fork_exec", refuse)  # noqa: B010
    setattr(subprocess, "_fork_exec", refuse)  # noqa: B010 (3.11+ binds it at import)


def _execute(path: str) -> int:
    """Run the file as `python path` would, in a fresh __main__; the exit code it ends with."""
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    sys.argv = [path]
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ else None  # skip this frame
        traceback.print_exception(type(e), e, tb)
        return 1
    return 0


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]), int(sys.argv[2]))
