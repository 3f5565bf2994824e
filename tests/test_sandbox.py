"""Tests for the code sandbox of sandbox.py (test kinds, comparisons, isolation) and sandbox.py's
code_reward and extract_program on top of it."""

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import sandbox
from rewards import code_reward, extract_program
from sandbox import SandboxLimits, run_tests

MODES = ["bwrap", "rlimit"]
NOBODY = 65534  # the uid programs run as when the tests run as root


@pytest.fixture(params=MODES)
def mode(request):
    """Run a test once with bubblewrap and once with the rlimit mode (opted in: `sandbox=mode`)."""
    if request.param == "bwrap" and not sandbox._bwrap_usable():
        pytest.skip("bubblewrap is not installed or not usable here (apt-get install bubblewrap)")
    return request.param


def needs_root_in_rlimit_mode(mode):
    """Without bubblewrap and without root, the rlimit mode runs programs as the calling user: it cannot
    hide that user's processes, files or network (install bubblewrap for real isolation)."""
    if mode == "rlimit" and os.geteuid() != 0:
        pytest.skip("the rlimit mode isolates users only when running as root")


def needs_bwrap_for(mode, what):
    """What the rlimit mode does not cover at all (sandbox.py's docstring says so)."""
    if mode == "rlimit":
        pytest.skip(f"the rlimit mode does not isolate {what}")


def processes_of(uid):
    """Live processes (zombies hold nothing) whose real uid is `uid`."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as handle:
                status = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == uid and status["State"].split()[0] not in ("Z", "X"):
            pids.add(int(pid))
    return pids


def assert_contained(report, before=frozenset()):
    """No process of the run's uid is alive but those in `before`, and its directories are gone."""
    if report.uid is not None:
        deadline = time.monotonic() + 3.0
        while (alive := processes_of(report.uid) - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive, f"processes of uid {report.uid} left behind: {alive}"
    for workdir in report.workdirs:
        assert not os.path.exists(workdir), f"{workdir} left behind"


ADD_STDIO = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_FUNCTION = "def add(a, b):\n    return a + b\n"
CHECK_ADD = {
    "check": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


# --------------------------------------------------------------------------------------------------
# The three kinds of tests
# --------------------------------------------------------------------------------------------------


def test_stdio_tests(mode):
    tests = [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "5 5\n", "output": "10"},
        {"input": "2 2\n", "output": "5\n"},
    ]
    before = processes_of(NOBODY)
    report = run_tests(ADD_STDIO, tests, sandbox=mode)
    assert report.sandbox == mode
    assert (report.passed, report.total) == (2, 3)
    assert [o.reason for o in report.outcomes] == ["passed", "passed", "wrong_answer"]
    assert report.failures == {"wrong_answer": 1}
    assert not report.all_passed
    assert code_reward(ADD_STDIO, tests[:2], sandbox=mode) == 1.0
    assert code_reward(ADD_STDIO, tests, sandbox=mode) == 0.0
    assert_contained(report, before)


def test_function_call_tests(mode):
    tests = [
        {"call": "add", "args": [1, 2], "expected": 3},
        {"call": "add", "args": [[1], [2, 3]], "expected": [1, 2, 3]},
        {"call": "add", "args": ["a", "b"], "expected": "ab"},
        {"call": "add", "args": [0.1, 0.2], "expected": 0.3},  # numbers with a tolerance
        {"call": "add", "args": [1, 1], "expected": 3},
        {"call": "sub", "args": [1, 1], "expected": 0},  # no such function
    ]
    before = processes_of(NOBODY)
    report = run_tests(ADD_FUNCTION, tests, sandbox=mode)
    assert [o.reason for o in report.outcomes] == ["passed"] * 4 + ["wrong_answer", "runtime_error"]
    assert "KeyError" in report.outcomes[5].detail
    assert_contained(report, before)


def test_humaneval_style_check(mode):
    before = processes_of(NOBODY)
    assert run_tests(ADD_FUNCTION, [CHECK_ADD], sandbox=mode).all_passed
    wrong = run_tests("def add(a, b):\n    return a - b\n", [CHECK_ADD], sandbox=mode)
    assert wrong.outcomes[0].reason == "wrong_answer"
    crash = run_tests("def add(a, b):\n    return 1 / 0\n", [CHECK_ADD], sandbox=mode)
    assert crash.outcomes[0].reason == "runtime_error" and "ZeroDivisionError" in crash.outcomes[0].detail
    syntax = run_tests("def add(a, b)\n    return a + b\n", [CHECK_ADD], sandbox=mode)
    assert syntax.outcomes[0].reason == "runtime_error" and "SyntaxError" in syntax.outcomes[0].detail
    assert_contained(wrong, before)


def test_check_sees_tuples_sets_and_dicts_as_such(code_sandbox):
    program = "def f():\n    return (1, 2), {3}, {(1, 2): b'x'}, None, 2.5, True\n"
    check = (
        "def check(candidate):\n    t, s, d, n, x, b = candidate()\n"
        "    assert t == (1, 2) and type(t) is tuple and s == {3} and d == {(1, 2): b'x'}\n"
        "    assert n is None and x == 2.5 and b is True\n"
    )
    assert run_tests(program, [{"check": check, "entry_point": "f"}]).all_passed


def test_mixed_kinds_and_fail_fast(code_sandbox):
    tests = [{"input": "1 2\n", "output": "4\n"}, {"input": "1 2\n", "output": "3\n"}]
    report = run_tests(ADD_STDIO, tests, fail_fast=True)
    assert [o.reason for o in report.outcomes] == ["wrong_answer", "skipped"]


def test_bad_tests_are_rejected_clearly():
    with pytest.raises(ValueError, match="at least one test"):
        run_tests(ADD_FUNCTION, [])
    with pytest.raises(ValueError, match="test 1 has keys"):
        run_tests(ADD_FUNCTION, [{"call": "add", "args": [1, 2], "expected": 3}, {"inp": "1"}])
    with pytest.raises(ValueError, match="sandbox must be"):
        run_tests(ADD_FUNCTION, [{"call": "add", "args": [], "expected": 3}], sandbox="docker")
    with pytest.raises(TypeError, match="program must be a str"):
        run_tests(None, [{"input": "", "output": ""}])


def test_sandbox_mode_is_logged_once(caplog):
    sandbox._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="sandbox"):
        for _ in range(2):
            run_tests(ADD_FUNCTION, [{"call": "add", "args": [1, 2], "expected": 3}], sandbox="rlimit")
    announced = [r for r in caplog.records if r.name == "sandbox" and "code sandbox:" in r.getMessage()]
    assert len(announced) == 1, [r.getMessage() for r in announced]
    assert announced[0].levelno == logging.WARNING  # the rlimit mode does not isolate: a warning
    assert "rlimit mode (opted in)" in announced[0].getMessage()


def test_sandbox_can_be_forced_by_environment(monkeypatch):
    monkeypatch.setenv("TREERL_SANDBOX", "rlimit")
    assert run_tests(ADD_FUNCTION, [{"call": "add", "args": [1, 2], "expected": 3}]).sandbox == "rlimit"
    monkeypatch.setenv("TREERL_SANDBOX", "docker")
    with pytest.raises(ValueError, match=r"\$TREERL_SANDBOX must be"):
        run_tests(ADD_FUNCTION, [{"call": "add", "args": [1, 2], "expected": 3}])


# --------------------------------------------------------------------------------------------------
# Safe by default: no usable bubblewrap, no code execution unless the weak mode is asked for by name
# --------------------------------------------------------------------------------------------------


def test_without_bubblewrap_code_execution_stops_naming_the_install_and_the_opt_in(no_bwrap, monkeypatch):
    tests = [{"input": "1 2\n", "output": "3\n"}]
    for run in (lambda: code_reward(ADD_STDIO, tests), lambda: run_tests(ADD_STDIO, tests, sandbox="bwrap")):
        with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap") as error:
            run()
        message = str(error.value)
        assert "not installed" in message and "apt-get install bubblewrap" in message
        assert "TREERL_SANDBOX=rlimit" in message and "does not isolate" in message
    # The explicit opt-ins, by argument and by environment:
    assert code_reward(ADD_STDIO, tests, sandbox="rlimit") == 1.0
    monkeypatch.setenv("TREERL_SANDBOX", "rlimit")
    assert code_reward(ADD_STDIO, tests) == 1.0
    assert sandbox.resolve_sandbox() == "rlimit"


def test_a_bubblewrap_that_cannot_start_a_sandbox_is_not_usable(no_bwrap, monkeypatch, tmp_path):
    """Installed is not enough (user namespaces may be off): usable means a probe run succeeds."""
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(sandbox.SandboxUnavailable, match="cannot start a sandbox here: bwrap: No permissions"):
        code_reward(ADD_STDIO, [{"input": "1 2\n", "output": "3\n"}])


def test_program_runs_as_an_unprivileged_user(mode):
    if os.geteuid() != 0:
        pytest.skip("uid 65534 is only used when running as root")
    report = run_tests(
        "import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n",
        [{"input": "", "output": "0 0 []\n"}],
        sandbox=mode,
    )
    assert report.uid == NOBODY and report.outcomes[0].reason == "wrong_answer"
    assert f"{NOBODY} {NOBODY} []" in report.outcomes[0].detail


def test_other_processes_of_the_uid_leave_the_process_limit_to_the_run(mode):
    """The process limit counts every process of the uid: other runs' and leftovers come on top."""
    if os.geteuid() != 0:
        pytest.skip("uid 65534 is only used when running as root")
    sleepers = [subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY, extra_groups=[]) for _ in range(20)]
    program = (
        "import threading\nthreads = [threading.Thread(target=lambda: None) for _ in range(8)]\n"
        "for thread in threads:\n    thread.start()\nfor thread in threads:\n    thread.join()\nprint(len(threads))\n"
    )
    try:
        limits = SandboxLimits(processes=16)  # fewer than the sleepers
        assert run_tests(program, [{"input": "", "output": "8\n"}], sandbox=mode, limits=limits).all_passed
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


# --------------------------------------------------------------------------------------------------
# Comparisons and program extraction (no sandbox needed)
# --------------------------------------------------------------------------------------------------


def test_output_comparison_rules():
    assert sandbox._outputs_match("3  \n4\n\n\n", "3\n4")  # trailing whitespace and blank lines
    assert sandbox._outputs_match("0.3333333\n", "0.33333333\n")  # numbers with a tolerance
    assert sandbox._outputs_match("1 2.0000000001\n", "1 2\n")
    assert not sandbox._outputs_match("1 2\n", "1  3\n")
    assert not sandbox._outputs_match("3\n4\n", "3\n")
    assert not sandbox._outputs_match("nan\n", "1\n")
    assert sandbox._outputs_match(" 3\n", "3\n")  # a line that differs only in spacing: same tokens


def test_value_comparison_rules():
    assert sandbox._values_match((1, 2), [1, 2])  # JSON test files cannot write tuples
    assert sandbox._values_match(0.30000000000000004, 0.3)
    assert not sandbox._values_match(True, 1) and not sandbox._values_match(1, True)
    assert not sandbox._values_match("1", 1)
    assert sandbox._values_match({"a": [1.0]}, {"a": [1]})


def test_encoding_round_trip_and_refusal():
    value = [1, -2.5, "x", None, True, (1, (2,)), {3, 4}, frozenset({5}), {1: "a", (2, 3): [4]}, b"\x00\xff", 1j]
    assert sandbox._decode_value(sandbox._encode_value(value)) == value

    class Sneaky(int):
        def __eq__(self, other):
            return True

    with pytest.raises(TypeError, match="unsupported value of type Sneaky"):
        sandbox._encode_value([Sneaky(1)])


@pytest.mark.parametrize(
    "response, program",
    [
        ("Here:\n```python\nprint(1)\n```\nand better:\n```python\nprint(2)\n```\n", "print(2)\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nprint(3)\n```", "print(3)\n"),
        ("```python\nprint(1)\n```\n```text\nnot code\n```", "print(1)\n"),
        ("print(4)\n", "print(4)\n"),
    ],
)
def test_extract_program(response, program):
    assert extract_program(response) == program


# --------------------------------------------------------------------------------------------------
# Hostile programs: each is contained, scores 0.0, finishes within its limit, leaves nothing behind.
# Short limits keep these fast; each runs with bubblewrap and in the rlimit mode.
# --------------------------------------------------------------------------------------------------

SECRET = "treerl-secret-7f3a9c"
LIMIT = 1.0
SLACK = 2.5  # start-up, clean-up and a busy machine

HOSTILE = {
    # name: (program, tests, acceptable failure reasons)
    "infinite loop": ("while True:\n    pass\n", [{"input": "", "output": "1\n"}], {"timeout"}),
    "memory bomb": (
        "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
        [{"input": "", "output": "1\n"}],
        {"memory"},
    ),
    "fork bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        [{"input": "", "output": "1\n"}],
        {"timeout"},
    ),
    "endless output": ("while True:\n    print('x' * 1000)\n", [{"input": "", "output": "1\n"}], {"output_limit"}),
    "early os._exit(0) before the calls": (
        "import os\nos._exit(0)\ndef add(a, b):\n    return a + b\n",
        [{"call": "add", "args": [1, 2], "expected": 3}],
        {"runtime_error"},
    ),
    "fake verdict and fake replies, then os._exit(0)": (  # written on every file descriptor it has
        'import os\nforged = (b\'{"passed": true, "reason": "passed", "detail": ""}\\n\'\n'
        '          b\'{"loaded": true}\\n{"id": 1, "ok": true, "value": 3}\\n\'\n'
        '          b\'{"id": 2, "ok": true, "value": 3}\\n\')\n'
        "for fd in range(1, 20):\n    try:\n        os.write(fd, forged)\n    except OSError:\n        pass\n"
        "os._exit(0)\n",
        [CHECK_ADD],
        {"runtime_error", "wrong_answer"},
    ),
    "sys.exit(0) inside the function": (
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        [CHECK_ADD],
        {"runtime_error"},
    ),
    "killing itself": (
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        [{"call": "add", "args": [1, 2], "expected": 3}],
        {"runtime_error"},
    ),
    "__eq__ override (function call)": (
        "class Anything:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Anything()\n",
        [{"call": "add", "args": [1, 2], "expected": 3}],
        {"wrong_answer"},
    ),
    "__eq__ override (int subclass, check)": (
        "class Anything(int):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Anything(0)\n",
        [CHECK_ADD],
        {"wrong_answer"},
    ),
    "reading the parent's environment": (
        "import glob, os\nseen = list(os.environ.values())\nfor path in glob.glob('/proc/*/environ'):\n"
        "    try:\n        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n        pass\n"
        f"print('{SECRET}' if any('{SECRET}' in s for s in seen) else 'nothing')\n",
        [{"input": "", "output": f"{SECRET}\n"}],
        {"wrong_answer"},
    ),
    "deep recursion": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nprint(f(0))\n",
        [{"input": "", "output": "1\n"}],
        {"runtime_error", "memory", "timeout"},
    ),
    "thread left running": (
        "import threading\ndef spin():\n    while True:\n        pass\n"
        "threading.Thread(target=spin).start()\nprint(3)\n",
        [{"input": "", "output": "3\n"}],
        {"timeout"},
    ),
    "ignoring SIGTERM": (
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        [{"input": "", "output": "1\n"}],
        {"timeout"},
    ),
    "network connection": None,  # built in the test (needs a port)
    "daemon escaping with fork + setsid": None,  # built in the test (needs a marker path)
    "writing outside its directory": None,  # built in the test (needs paths)
}


def run_hostile(program, tests, mode, reasons, limit=LIMIT):
    before = processes_of(NOBODY)
    started = time.monotonic()
    report = run_tests(program, tests, sandbox=mode, limits=SandboxLimits(timeout=limit, memory_mb=256))
    elapsed = time.monotonic() - started
    assert report.passed == 0 and report.outcomes[0].reason in reasons, report.outcomes[0]
    if report.outcomes[0].reason != "timeout":  # (spare the suite a second wait)
        assert code_reward(program, tests, sandbox=mode, timeout=limit) == 0.0
    assert elapsed < limit * len(tests) + SLACK, f"took {elapsed:.2f} s"
    assert_contained(report, before)
    return report


@pytest.mark.parametrize("name", [name for name, case in HOSTILE.items() if case is not None])
def test_hostile_program(name, mode, monkeypatch):
    if name == "reading the parent's environment":
        needs_root_in_rlimit_mode(mode)
    monkeypatch.setenv("TREERL_TEST_SECRET", SECRET)  # the parent's environment holds a secret
    program, tests, reasons = HOSTILE[name]
    run_hostile(program, tests, mode, reasons)


def test_hostile_network_connection(mode):
    needs_bwrap_for(mode, "the network")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    program = (
        f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
        "    print('CONNECTED')\nexcept OSError as error:\n    print('blocked', error)\n"
    )
    try:
        run_hostile(program, [{"input": "", "output": "CONNECTED\n"}], mode, {"wrong_answer"})
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_hostile_daemon_escaping_with_setsid_under_bubblewrap(mode):
    """bubblewrap's PID namespace ends the daemon with the run: its marker is never written. (The
    rlimit mode's supervisor ends it too: the next test, which can see its pid.)"""
    needs_bwrap_for(mode, "the PID namespace")
    drop = tempfile.mkdtemp(prefix="treerl-drop-")  # in the shared /tmp, writable by anyone who sees it
    os.chmod(drop, 0o777)
    marker = os.path.join(drop, "daemon-was-here")
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.3)\n"
        "        print(3, flush=True)\n"  # too late: the program already ended
        f"        time.sleep(0.5)\n        open({marker!r}, 'w').write('escaped')\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
    )
    try:
        run_hostile(program, [{"input": "", "output": "3\n"}], mode, {"wrong_answer"})
        time.sleep(1.0)  # the daemon would have written its marker by now
        assert not os.path.exists(marker)
    finally:
        shutil.rmtree(drop)


def leaving_behind(drop: str, then: str) -> str:
    """A program that leaves processes behind, each writing its pid to a file in `drop` first: a
    `setsid` daemon (fork, setsid, fork again), a child in a process group of its own and a `sleep`
    started with subprocess. Then it `then`: "exits" (and defines `add`), or "hangs" until killed."""
    return (
        "import os, subprocess, time\n"
        f"drop = {drop!r}\n"
        "def note(name, pid):\n"
        "    with open(os.path.join(drop, name + '.part'), 'w') as handle:\n"
        "        handle.write(str(pid))\n"
        "    os.rename(os.path.join(drop, name + '.part'), os.path.join(drop, name))\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        note('daemon', os.getpid())\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "if os.fork() == 0:\n"
        "    os.setpgid(0, 0)\n"
        "    note('group', os.getpid())\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "note('sleep', subprocess.Popen(['sleep', '60']).pid)\n"
        "while sorted(os.listdir(drop)) != ['daemon', 'group', 'sleep']:\n"
        "    time.sleep(0.01)\n"
        + ("print(3)\ndef add(a, b):\n    return a + b\n" if then == "exits" else "time.sleep(60)\n")
    )


def assert_gone(pid: int, wait: float = 2.0) -> None:
    """No process `pid` exists (a zombie would still count: the supervisor must reap what it kills)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process {pid} outlived its run"
        time.sleep(0.05)


@pytest.mark.parametrize("then", ["exits", "hangs"])
@pytest.mark.parametrize("kind", ["stdio", "call"])
def test_rlimit_mode_ends_every_process_a_program_starts(kind, then):
    """Opted in, the weak mode still ends all a program started, at the end of its run: whether the
    program exits or is stopped at its time limit, and processes that left its process group (a
    `setsid` daemon, a process group of its own) as well. As any user, not only root."""
    drop = tempfile.mkdtemp(prefix="treerl-drop-")  # the program may run as uid 65534: open to it
    os.chmod(drop, 0o777)
    test = {"input": "", "output": "3\n"} if kind == "stdio" else {"call": "add", "args": [1, 2], "expected": 3}
    try:
        report = run_tests(leaving_behind(drop, then), [test], sandbox="rlimit", limits=SandboxLimits(timeout=LIMIT))
        assert report.outcomes[0].reason == ("passed" if then == "exits" else "timeout"), report.outcomes[0]
        pids = {name: int(Path(drop, name).read_text()) for name in ("daemon", "group", "sleep")}
        for pid in pids.values():
            assert_gone(pid)
    finally:
        for name in ("daemon", "group", "sleep"):  # should a check above fail: leave nothing running
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(drop, name).read_text()), signal.SIGKILL)
        shutil.rmtree(drop)


def test_hostile_writing_outside_its_directory(mode, tmp_path):
    needs_root_in_rlimit_mode(mode)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = f"treerl-escape-{os.getpid()}-{mode}"
    targets = ["../" + name, "/" + name, "/etc/" + name, str(outside / name), os.path.join(os.getcwd(), name)]
    shared = ["/tmp/" + name, "/var/tmp/" + name, "/dev/shm/" + name]
    # Not as root, bubblewrap's / (and /etc in it) is the sandbox's own tmpfs, writable by the program
    # and thrown away with it: those writes are checked from outside (below), not by the program.
    unseen = shared + (targets[:3] if mode == "bwrap" and os.geteuid() != 0 else [])
    program = (
        "import os\nescaped = []\n"
        f"for path in {targets + shared!r}:\n"
        "    try:\n        with open(path, 'w') as handle:\n            handle.write('x')\n"
        "        escaped.append(path)\n    except OSError:\n        pass\n"
        f"escaped = [p for p in escaped if p not in {unseen!r}]\n"  # shared temp dirs: see below
        "print('ESCAPED' if escaped else 'contained')\n"
    )
    try:
        run_hostile(program, [{"input": "", "output": "ESCAPED\n"}], mode, {"wrong_answer"})
        # With bubblewrap the shared temp directories are private to the sandbox; the rlimit mode
        # lets the program write there (sandbox.py's docstring says so).
        for path in [outside / name, os.path.join(os.getcwd(), name), "/" + name, "/etc/" + name]:
            assert not os.path.exists(path), f"{path} was left behind"
        if mode == "bwrap":
            assert not any(os.path.exists(path) for path in shared), "a shared temp directory was written"
    finally:
        for path in shared:
            if os.path.exists(path):
                os.unlink(path)
