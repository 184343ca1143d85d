"""The sandbox contains what sloppy model-written code does, and scores correct code as passed.

Processes a program leaves behind are found by a marker name it gives itself (prctl
PR_SET_NAME, inherited by forks), so the checks see every such process on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from lmforge.eval import sandbox, sandbox_child
from lmforge.eval.sandbox import SandboxLimits, SandboxResult, run_sandboxed

LIMITS = SandboxLimits(cpu_seconds=5, wall_seconds=5.0, memory_bytes=1 * 2**30, max_processes=16)
NOT_PASSED = ("failed", "timeout", "killed")


def run(program: str, **limits: float) -> SandboxResult:
    return run_sandboxed(textwrap.dedent(program), replace(LIMITS, **limits))


def named(marker: str) -> str:
    """Program lines that give the process (and its future forks) the name marker."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"


def living(marker: str, wait_s: float = 3.0) -> list[psutil.Process]:
    """Processes named marker that are still alive after up to wait_s seconds (zombies excluded)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [
            p
            for p in psutil.process_iter(["name", "status"])
            if p.info["name"] == marker and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def marker() -> Iterator[str]:
    name = "lmf" + uuid.uuid4().hex[:10]
    yield name
    for process in living(name, wait_s=0):  # never leave strays behind, even on failure
        process.kill()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        yield s


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sandbox.wall_seconds"):
        SandboxLimits(wall_seconds=0)


@pytest.mark.parametrize(
    ("program", "status", "exit_code", "in_stderr"),
    [
        ("print('hello')", "passed", 0, ""),
        ("raise SystemExit(3)", "failed", 3, ""),
        ("raise SystemExit('bye')", "failed", 1, "bye"),
        ("import os\nos._exit(7)", "failed", 7, ""),
        ("1 / 0", "failed", 1, "ZeroDivisionError"),
        ("def f(:\n    pass", "failed", 1, "SyntaxError"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed", -9, ""),
    ],
)
def test_exit_is_scored(program: str, status: str, exit_code: int, in_stderr: str) -> None:
    result = run(program)
    assert (result.status, result.exit_code) == (status, exit_code), result.stderr
    assert in_stderr in result.stderr
    assert "write-guard" in result.isolation


def test_program_sees_a_fresh_isolated_process_that_is_removed_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cgroups: list[Path | None] = []
    make = sandbox._make_pids_cgroup

    def make_and_remember(max_tasks: int) -> Path | None:
        cgroups.append(make(max_tasks))
        return cgroups[-1]

    monkeypatch.setattr(sandbox, "_make_pids_cgroup", make_and_remember)
    result = run(
        """
        import os, sys, tempfile
        print(os.getcwd())
        print(sorted(os.listdir(".")))
        print(sorted(os.environ))
        print(sys.flags.isolated, repr(sys.stdin.read()))
        os.makedirs("sub/dir")
        open("sub/dir/a.txt", "w").write("inside is fine")
        tempfile.NamedTemporaryFile(delete=False).write(b"so is TMPDIR")
        os.chmod("sub", 0)
        """
    )
    assert result.status == "passed", result.stderr
    cwd, listing, env, flags = result.stdout.splitlines()
    assert listing == "['program.py']"
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}
    assert flags == "1 ''"
    assert not Path(cwd).exists()
    assert all(path is None or not path.exists() for path in cgroups)


def test_stdout_is_truncated() -> None:
    result = run("print('x' * 100_000)", max_output_bytes=1000)
    assert result.status == "passed"
    assert result.stdout == "x" * 1000


def test_file_size_limit() -> None:
    result = run("open('big', 'wb').write(b'x' * 2**20)", file_size_bytes=64 * 2**10)
    assert result.status == "failed"
    assert "File too large" in result.stderr


ESCAPES = {
    "open": "open({target!r}, 'w').write('x')",
    "pathlib": "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "os.open": "import os\nos.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY))",
    "relative": "import os\nopen(os.path.relpath({target!r}), 'a').write('x')",
    "chdir": "import os\nos.chdir({parent!r})\nopen('escaped.txt', 'x').write('x')",
    "makedirs": "import os\nos.makedirs({target!r})",
    "copy": "import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', {target!r})",
    "rename": "import os\nopen('a', 'w').write('x')\nos.rename('a', {target!r})",
    "symlink": "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
}


@pytest.mark.parametrize("how", ESCAPES)
def test_writes_outside_the_working_directory_are_refused(tmp_path: Path, how: str) -> None:
    target = tmp_path / "escaped.txt"
    result = run(ESCAPES[how].format(target=str(target), parent=str(tmp_path)))
    assert result.status == "failed"
    assert "PermissionError" in result.stderr
    assert not target.exists()


@pytest.mark.parametrize("path", ["/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/2"])
def test_a_program_may_print_through_its_own_stream_paths(path: str) -> None:
    """/dev/stdout resolves to the sandbox's capture file outside the working dir; writing
    to it is printing, not escaping (a correct program failed with PermissionError)."""
    result = run(f"open({path!r}, 'w').write('said so')\n")
    assert result.status == "passed", result.stderr
    assert "said so" in (result.stdout if "1" in path or "out" in path else result.stderr)


def test_a_working_dir_nested_past_the_recursion_limit_is_removed(tmp_path: Path) -> None:
    """shutil.rmtree and os.walk recurse: 3,000 nested folders raised RecursionError out of
    the sandbox's cleanup and ended the whole HumanEval run."""
    root = tmp_path / "work"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    sandbox._remove_tree(root)
    assert not root.exists()


@pytest.mark.parametrize(
    "damage",
    [
        "import os\nos.remove({keep!r})",
        "open({keep!r}, 'w')",
        "import os\nos.truncate({keep!r}, 0)",
        "import shutil\nshutil.rmtree({folder!r})",
    ],
)
def test_files_outside_are_not_deleted_or_truncated(tmp_path: Path, damage: str) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    result = run(damage.format(keep=str(keep), folder=str(tmp_path)))
    assert result.status == "failed"
    assert keep.read_text() == "precious"


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace", "socket-guard"])
def test_network_connections_do_not_arrive(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, namespaces: bool
) -> None:
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", namespaces)
    port = listener.getsockname()[1]
    result = run(
        f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hi")
        """
    )
    assert result.status == "failed", result.stdout
    with pytest.raises(BlockingIOError):
        listener.accept()
    expected = "net-namespace" if namespaces else "socket-guard"
    if expected not in result.isolation:
        pytest.skip(f"no {expected} on this machine: {result.isolation}")


def test_huge_allocation_fails_fast() -> None:
    result = run("x = bytearray(10 * 2**30)")
    assert result.status == "failed"
    assert "MemoryError" in result.stderr
    assert result.duration_s < 3


def test_endless_loop_times_out_on_the_wall_clock() -> None:
    result = run("while True:\n    pass", wall_seconds=1.0)
    assert (result.status, result.exit_code) == ("timeout", None)
    assert 1.0 <= result.duration_s < 2.5


def test_cpu_limit_counts_as_timeout() -> None:
    result = run("while True:\n    pass", cpu_seconds=1, wall_seconds=10.0)
    assert (result.status, result.exit_code) == ("timeout", -signal.SIGXCPU)
    assert result.duration_s < 4


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace", "no-namespace"])
@pytest.mark.parametrize("leave_group", [False, True], ids=["child", "setsid-child"])
def test_children_left_running_are_killed(
    marker: str, monkeypatch: pytest.MonkeyPatch, namespaces: bool, leave_group: bool
) -> None:
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", namespaces)
    result = run(
        f"""
        import os, time
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            if {leave_group}:
                os.setsid()
            {named(marker).replace(chr(10), chr(10) + 12 * " ")}
            os.write(ready_w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready_r, 1)  # the child has its name: exit and leave it sleeping
        """
    )
    if "fork-guard" in result.isolation:
        pytest.skip("root without a pids cgroup: the sandbox refuses fork()")
    if leave_group and not {"pid-namespace", "pids-cgroup"} & set(result.isolation):
        pytest.skip(f"nothing here catches a setsid() escapee: {result.isolation}")
    assert result.status == "passed", result.stderr
    assert result.duration_s < 5
    assert not living(marker)


def test_fork_bomb_is_capped_and_leaves_nothing(marker: str) -> None:
    # First prove the cap with a bounded probe (40 sleepers at worst), then run the real bomb.
    probe = named(marker) + textwrap.dedent(
        """
        import os, time
        started = 0
        for _ in range(40):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
            except OSError:
                break
            started += 1
        print(started)
        """
    )
    result = run_sandboxed(probe, replace(LIMITS, max_processes=8))
    assert result.status == "passed", result.stderr
    assert int(result.stdout) < 8, f"fork not capped: {result.isolation}"
    assert not living(marker)

    bomb = named(marker) + "import os\nwhile True:\n    os.fork()\n"
    result = run_sandboxed(bomb, replace(LIMITS, max_processes=8, wall_seconds=3.0))
    assert result.status in NOT_PASSED
    assert result.duration_s < 4.5
    assert not living(marker)


@pytest.mark.skipif(os.geteuid() != 0, reason="the fork guard is for root without a cgroup")
def test_root_without_pids_cgroup_gets_no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_USE_CGROUPS", False)
    for program in ["import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])"]:
        result = run(program)
        if "unprivileged-user" in result.isolation:  # its own user has a process limit that works
            assert "nproc-rlimit" in result.isolation and "fork-guard" not in result.isolation
            assert result.status == "passed", result.stderr
            continue
        assert "fork-guard" in result.isolation
        assert result.status == "failed"
        assert "PermissionError" in result.stderr


SYSTEM_PYTHON = "/usr/bin/python3"
"""An interpreter that a user without rights can reach, unlike one under /root (this test's)."""


@pytest.fixture
def as_run_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run programs through SYSTEM_PYTHON, so that root's program drops to the run's own user."""
    if os.geteuid() != 0:
        pytest.skip("only root's programs change user")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON}")
    probe = "import os, sys; print(os.path.dirname(os.__file__)); print(*sys.path[1:], sep='\\n')"
    needed = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", probe], capture_output=True, text=True
    ).stdout.split()
    if not all(sandbox_child._others_can_read(p) for p in needed if os.path.isdir(p)):
        pytest.skip(f"{SYSTEM_PYTHON}'s library is out of an unprivileged user's reach")
    monkeypatch.setattr(sandbox, "_PYTHON", SYSTEM_PYTHON)


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace", "no-namespace"])
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "no-cgroup"])
def test_root_runs_the_program_as_its_own_user_who_reads_no_secrets_and_writes_only_its_dir(
    as_run_user: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    namespaces: bool,
    cgroups: bool,
) -> None:
    """Without a user namespace, a program running as root read the evaluator's environment
    (an HF_TOKEN, say) from /proc/PID/environ, and wrote anywhere by going around Python. As
    the run's own user it still prints through /dev/stdout, writes its dir by absolute path
    and uses tempfile (each failed with EACCES when that user was `nobody`)."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", namespaces)
    monkeypatch.setattr(sandbox, "_USE_CGROUPS", cgroups)
    secret = "lmf-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("LMFORGE_TEST_SECRET", secret)
    outside = tmp_path / "outside.txt"
    result = run(
        f"""
        import _io, os, tempfile
        print(os.getuid() >= 2**30, os.getgid() == os.getuid(), os.getgroups())
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{{pid}}/environ", "rb") as f:
                    assert {secret.encode()!r} not in f.read(), pid
            except OSError:
                pass
        try:
            _io.FileIO({str(outside)!r}, "w")  # not through the write guard
        except PermissionError:
            print("refused")
        open(os.path.abspath("inside.txt"), "w").write("fine")
        tempfile.NamedTemporaryFile().write(b"fine")
        if os.fork() == 0:
            os._exit(0)
        print(os.wait()[1], flush=True)  # before another descriptor appends to the same file
        open("/dev/stdout", "a").write("said so\\n")
        """
    )
    assert result.status == "passed", result.stderr
    assert result.stdout.splitlines() == ["True True []", "refused", "0", "said so"]
    assert not outside.exists()
    assert "unprivileged-user" in result.isolation
    assert ("pids-cgroup" if cgroups else "nproc-rlimit") in result.isolation


def test_runs_at_once_have_process_limits_of_their_own(
    as_run_user: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a pids cgroup, RLIMIT_NPROC counts the tasks of the program's user: when all runs
    shared `nobody`, one run's threads made another's fail to start its own."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", False)
    monkeypatch.setattr(sandbox, "_USE_CGROUPS", False)
    program = """
        import threading, time
        time.sleep(0.5)  # both runs have set their limits by now
        started = []
        for _ in range(12):
            t = threading.Thread(target=time.sleep, args=(1.0,))
            t.start()
            started.append(t)
        print(len(started))
        """
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run(program, max_processes=16), range(2)))
    for result in results:
        assert "nproc-rlimit" in result.isolation
        assert result.status == "passed", result.stderr
        assert result.stdout == "12\n"


def test_root_in_a_user_namespace_that_maps_root_alone_keeps_its_user(as_run_user: None) -> None:
    """`unshare -r` (rootless containers, some CI) maps uid 0 alone: the run's own ids cannot
    exist there, and every run failed to start (chown: EINVAL) instead of running as root."""
    code = (
        "from lmforge.eval import sandbox\n"
        f"sandbox._PYTHON = {SYSTEM_PYTHON!r}\n"
        "r = sandbox.run_sandboxed('print(7 * 6)', sandbox.SandboxLimits())\n"
        "print(r.status, r.stdout.strip(), 'unprivileged-user' in r.isolation)\n"
    )
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if "unshare failed" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    assert done.stdout.split() == ["passed", "42", "False"], done.stderr


def test_concurrent_calls_from_threads_keep_their_own_results() -> None:
    def one(i: int) -> SandboxResult:
        return run(f"import sys, time\ntime.sleep(0.05)\nprint({i})\nsys.exit({i % 3})")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(12)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert [r.exit_code for r in results] == [i % 3 for i in range(12)]


def test_a_sandbox_that_cannot_start_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise SystemExit('no sandbox today')\n")
    monkeypatch.setattr(sandbox, "_CHILD", str(broken))
    with pytest.raises(RuntimeError, match="no sandbox today"):
        run("print('never runs')")
