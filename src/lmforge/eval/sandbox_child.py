"""The sandbox's child program: `python -I -B sandbox_child.py CONFIG REPORT_FD`.

sandbox.py starts it in a fresh working directory holding `program.py`. It sets up the
containment (cgroup or RLIMIT_NPROC, namespaces, rlimits, the Python-level guards), runs the
program and reports on REPORT_FD, a pipe the program never holds, what took effect and how the
program ended. Standard library only: it runs in isolated mode, before anything is trusted.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any, NoReturn

PROGRAM = "program.py"
"""The file sandbox.py writes the code to, in the child's working directory."""
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000


def _child_main(config: dict[str, Any], report_fd: int) -> NoReturn:
    """Set up containment, then run the program: directly, or under our init in new namespaces."""
    limits = config["limits"]
    isolation: list[str] = []
    nproc = None
    drop_to = _run_ids() if os.geteuid() == 0 else None
    if config["cgroup"] and _join_cgroup(config["cgroup"]):
        isolation.append("pids-cgroup")
    elif os.geteuid() != 0 or drop_to is not None:  # the run's own user has no tasks yet
        nproc = _user_tasks(drop_to[0] if drop_to else os.getuid()) + limits["max_processes"]
        isolation.append("nproc-rlimit")
    else:
        isolation.append("fork-guard")  # Linux ignores RLIMIT_NPROC for root
    namespaced = config["ns"] and _enter_namespaces(isolation, drop_to)
    if drop_to is not None:
        isolation.append("unprivileged-user")
    isolation += ["write-guard"] if namespaced else ["write-guard", "socket-guard"]
    _report(report_fd, isolation=isolation)
    if not namespaced:
        if "pids-cgroup" in isolation:  # no init of ours in the cgroup: give the program its two
            _write(os.path.join(config["cgroup"], "pids.max"), str(limits["max_processes"]))
        _run_program(limits, nproc, drop_to, isolation, report_fd)
    init = os.fork()  # pid 1 of the new PID namespace
    if init == 0:
        program = os.fork()
        if program == 0:
            _run_program(limits, nproc, drop_to, isolation, report_fd)
        _report(report_fd, wait_status=_reap_until(program))
        os._exit(0)  # the kernel now kills every process left in the namespace
    os.close(report_fd)
    os.waitpid(init, 0)
    os._exit(0)  # skip interpreter teardown: ~25 ms per run


RUN_ID_BASE = 1 << 30
"""Root's programs run as uid and gid RUN_ID_BASE + the child's pid: no account has such an id,
and runs alive at once never share one (a process limit or a kill of one run's user does not
touch another's)."""


def _run_ids() -> tuple[int, int] | None:
    """An unprivileged (uid, gid) of this run alone for root's program, given the working dir,
    the capture files on stdout/stderr and the program's imports (the interpreter, sys.path,
    the working dir by its absolute path) are within its reach. None where they are not (e.g.
    Python under /root, or ids the user namespace root is in cannot map): the program then
    runs as root rather than failing at its first import or path."""
    ident = RUN_ID_BASE + os.getpid()
    needed = [os.path.dirname(os.path.realpath(sys.executable)), *sys.path[1:]]  # [0]: ours
    if not all(_others_can_read(path) for path in needed if os.path.isdir(path)):
        return None
    if not _others_can_read(os.path.dirname(os.getcwd())):
        return None
    try:
        os.chown(".", ident, ident)
        for fd in (1, 2):  # the caller's capture files, which /dev/stdout and the like reopen
            os.fchown(fd, ident, ident)
    except OSError:  # e.g. EINVAL: a user namespace that maps root alone
        return None
    return ident, ident


def _others_can_read(directory: str) -> bool:
    """Whether a user with no rights of owner or group can list `directory` and reach it."""
    import stat

    path = os.path.realpath(directory)
    try:
        if os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
            return False
        while path != os.path.dirname(path):
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


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


def _enter_namespaces(isolation: list[str], drop_to: tuple[int, int] | None) -> bool:
    """New user + PID + network namespaces (for root, PID + network if user ones are refused).

    A process cannot map root into its own new user namespace (Linux >= 5.12 wants CAP_SETFCAP
    in the parent namespace), so a helper forked beforehand, still outside, writes the maps.
    `drop_to` (root's case) is mapped too, so the program can become that user inside; only a
    privileged writer may map two ids, and it may leave setgroups allowed, which the program
    needs to shed root's groups.
    """
    uid, gid = os.getuid(), os.getgid()
    uid_map, gid_map = f"{uid} {uid} 1", f"{gid} {gid} 1"
    if drop_to is not None:
        uid_map += f"\n{drop_to[0]} {drop_to[0]} 1"
        gid_map += f"\n{drop_to[1]} {drop_to[1]} 1"
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        target, code = os.getppid(), 0
        if os.read(go_r, 1) == b"1":
            try:
                if drop_to is None:
                    _write(f"/proc/{target}/setgroups", "deny")
                _write(f"/proc/{target}/uid_map", uid_map)
                _write(f"/proc/{target}/gid_map", gid_map)
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
    limits: dict[str, int],
    nproc: int | None,
    drop_to: tuple[int, int] | None,
    isolation: list[str],
    report_fd: int,
) -> NoReturn:
    """In the process that becomes the program: guards, limits, then the program itself."""
    try:
        with open(PROGRAM, encoding="utf-8") as f:
            source = f.read()  # before giving up root: the file may be root's alone
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to[1])
            os.setuid(drop_to[0])  # real, effective and saved: no way back, no capabilities
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
    code = _execute(PROGRAM, source)
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


_STD_STREAMS = frozenset(
    f"{prefix}{name}"
    for prefix in ("/dev/", "/dev/fd/", "/proc/self/fd/")
    for name in (("stdout", "stderr") if prefix == "/dev/" else ("1", "2"))
)
"""Paths of the program's stdout and stderr, which a test may open to print (check() did)."""


def _guard_writes(workdir: str) -> None:
    """Python-level writes outside workdir raise PermissionError (defense in depth, no more)."""
    import builtins
    import io

    root = os.path.realpath(workdir)

    def check(path: Any, dir_fd: int | None = None) -> None:
        if isinstance(path, int):
            return  # an open descriptor: judged when it was opened
        name = os.fsdecode(path)
        if dir_fd is None and os.path.normpath(name) in _STD_STREAMS:
            return  # the program's own stdout/stderr (files outside workdir, by their path)
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


def _execute(path: str, source: str) -> int:
    """Run source as `python path` would, in a fresh __main__; the exit code it ends with."""
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    sys.argv = [path]
    try:
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
