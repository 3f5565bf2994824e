"""Running what may not return or may not be trusted: the math worker pool and the code sandbox.

Skip this file on a first reading. rewards.py decides what counts as a correct answer; this module
makes those decisions safe to take inside a training loop:

1. **The math worker pool** (`MathVerifierPool`): sympy can spend minutes or all memory on one
   answer, so each equivalence check runs in a long-lived worker process with a hard wall-clock
   limit; an overrunning worker is killed and replaced, and the check scores 0.
2. **The code sandbox** (`run_tests`): a model's program runs against stdin/stdout tests,
   function-call tests or a HumanEval `check`, under bubblewrap when available (else resource
   limits, a private uid and process sweeps), and only the trusted side compares results, so a
   program cannot fake a pass.

Nothing here imports a model, needs a network or a GPU.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# =====================================================================================================
# 1. The math worker pool: hard wall-clock limits without ever hanging the trainer
# =====================================================================================================
#
# Why worker processes: sympy can spend minutes (or all memory) on inputs like `10^{10^{10}}`, and
# some of that work never returns to the interpreter, so no in-process timeout can stop it.
# math-verify's own timeout is SIGALRM, which only works on the main thread of the main interpreter.
# A separate process can always be killed. The pool keeps `workers` long-lived processes (so one
# check costs a pipe round trip, not a process start), sends each one check at a time, and if a
# check overruns its limit, kills that worker (SIGKILL), scores the check 0.0 and starts a fresh one.
# Workers exit when their stdin closes (the trainer exited) and are killed at interpreter exit.
#
# Why `subprocess` and not `multiprocessing`: the workers must not be forked from the trainer (it has
# torch threads; fork copies locks held by other threads). multiprocessing's "spawn"/"forkserver"
# contexts avoid fork but re-import the parent's `__main__` module in every worker, which for
# `train.py` would mean importing torch in each verifier process and on every restart. A
# `subprocess.Popen` of the interpreter is fork+exec done in C (no Python code runs in the forked
# child), i.e. a spawn that loads only this file and rewards.py; the worker talks JSON lines over
# its stdin/stdout.

_WORKER_STARTUP_LIMIT = 120.0  # importing sympy/math-verify on a busy 2-core machine can be slow
_MATH_WORKER_MEMORY = 4 << 30  # address-space limit of a math worker (bytes): `10^(10^10)` fails fast


def _worker_bootstrap() -> str:
    """Source of the `python -c` program a worker runs: load this file and the file that holds the
    check function, by path and under private module names, then serve checks.

    Loading by path means the worker does not depend on how the trainer imported us (flat layout,
    package, notebook) and never imports the trainer's `__main__`.
    """
    return (
        "import importlib.util, json, sys, traceback\n"
        "def load(name, path):\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    sys.modules[spec.name] = module\n"
        "    spec.loader.exec_module(module)\n"
        "    return module\n"
        "try:\n"
        "    pool = load('_treerl_sandbox_worker', sys.argv[1])\n"
        "    check = getattr(load('_treerl_checks_worker', sys.argv[2]), sys.argv[3])\n"
        "except BaseException:\n"
        "    print(json.dumps({'fatal': traceback.format_exc(limit=3)}), flush=True)\n"
        "    raise SystemExit(1)\n"
        "pool._worker_main(check)\n"
    )


def _limit_cpu_of_next_check(seconds: int) -> None:
    """Inside a worker: let the kernel kill this process if the next check uses `seconds` more CPU.

    The pool kills an overrunning worker itself; this is the backstop for when the pool cannot, for
    example because the trainer died while a check was stuck in C code (then the worker would never
    read the end of its stdin). SIGXCPU's default action ends the process even inside C code, where
    no Python-level handler or timer can run. Only the soft limit moves; the hard one stays open.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (used + seconds + 1, resource.RLIM_INFINITY))


def _worker_main(check) -> None:
    """Entry point of a worker process: read JSON checks on stdin, run `check(answer, gold,
    seconds)` on each, write JSON scores on stdout."""
    import resource

    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints from sympy and friends must not corrupt the protocol
    resource.setrlimit(resource.RLIMIT_AS, (_MATH_WORKER_MEMORY, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.RLIM_INFINITY))
    try:
        import math_verify  # noqa: F401  (imported once here, not per check)

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    except BaseException as error:  # a missing dependency must be reported, not scored as 0.0
        protocol_out.write(json.dumps({"fatal": f"{type(error).__name__}: {error}"}) + "\n")
        return
    protocol_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"id": request["id"], "score": 0.0}
        _limit_cpu_of_next_check(request["cpu_seconds"])
        try:
            if check(request["answer"], request["gold"], request["seconds"]):
                reply["score"] = 1.0
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # parse errors, MemoryError, math-verify's TimeoutException
            reply["error"] = type(error).__name__
        protocol_out.write(json.dumps(reply) + "\n")


class _MathWorker:
    """One worker process and what the pool knows about it."""

    def __init__(self, check_file: str, check_name: str) -> None:
        here = os.path.abspath(__file__)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _worker_bootstrap(), here, check_file, check_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.buffer = b""
        self.ready = False
        self.started_at = time.monotonic()
        self.job: int | None = None  # index of the check it is working on
        self.deadline = 0.0

    def read_lines(self) -> list[dict] | None:
        """Read what is available; return complete JSON messages, or None at end of file."""
        chunk = os.read(self.process.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def send(self, message: dict) -> None:
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathVerifierPool:
    """A pool of math-verify worker processes with a hard wall-clock limit per check.

    Each worker runs the function `check_name` of the file `check_file` (rewards.py's
    `_math_equal`): check(answer, gold, seconds) -> bool.

    `check(pairs, timeout)` scores `(answer, gold)` pairs (answers already extracted) and returns one
    float per pair: 1.0 equivalent, 0.0 not equivalent, timed out or failed. It never raises for a bad
    input and never waits longer than about `timeout` per check (plus worker start-up the first
    time). Thread-safe: concurrent callers take turns.
    """

    def __init__(self, check_file: str, check_name: str, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"MathVerifierPool needs at least 1 worker, got {workers}")
        self.check_function = (os.path.abspath(check_file), check_name)  # what each worker runs
        self.size = workers
        self.workers: list[_MathWorker | None] = [None] * workers
        self.lock = threading.Lock()
        self.owner_pid = os.getpid()
        self.restarts = 0  # how many workers were replaced after overrunning or dying

    def _worker(self, slot: int) -> _MathWorker:
        worker = self.workers[slot]
        if worker is None or worker.process.poll() is not None:
            if worker is not None:
                worker.kill()
            worker = self.workers[slot] = _MathWorker(*self.check_function)
        return worker

    def _replace(self, slot: int) -> None:
        """Kill the worker in `slot` and start its successor now, so it warms up in the background."""
        self.workers[slot].kill()
        self.workers[slot] = _MathWorker(*self.check_function)
        self.restarts += 1

    def check(self, pairs: list[tuple[str, str]], timeout: float) -> list[float]:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        with self.lock:
            try:
                return self._check(pairs, timeout)
            except BaseException:  # e.g. KeyboardInterrupt mid-batch: drop workers with stale jobs
                self.close()
                raise

    def _check(self, pairs: list[tuple[str, str]], timeout: float) -> list[float]:
        scores = [0.0] * len(pairs)
        pending = list(range(len(pairs)))[::-1]  # a stack; pop() gives the lowest index first
        inner_seconds = max(1, int(timeout / 3))  # math-verify's own alarm for parse, parse, verify
        selector = selectors.DefaultSelector()
        try:
            while True:
                # Hand out work to every idle, ready worker.
                for slot in range(self.size):
                    worker = self._worker(slot)
                    if worker.ready and worker.job is None and pending:
                        job = pending.pop()
                        answer, gold = pairs[job]
                        try:
                            worker.send(
                                {
                                    "id": job,
                                    "answer": answer,
                                    "gold": gold,
                                    "seconds": inner_seconds,
                                    "cpu_seconds": math.ceil(timeout) + 1,
                                }
                            )
                        except OSError:  # it died while idle: put the job back, restart the worker
                            pending.append(job)
                            self._replace(slot)
                            continue
                        worker.job, worker.deadline = job, time.monotonic() + timeout
                busy = [w for w in self.workers if w is not None and (w.job is not None or not w.ready)]
                if not pending and all(w.job is None for w in busy):
                    return scores
                self._wait_and_collect(selector, busy, scores)
        finally:
            selector.close()

    def _wait_and_collect(self, selector, busy: list[_MathWorker], scores: list[float]) -> None:
        """Wait for replies (or a deadline), record scores, kill and replace overrunning workers."""
        now = time.monotonic()
        deadlines = [w.deadline if w.ready else w.started_at + _WORKER_STARTUP_LIMIT for w in busy]
        for worker in busy:
            selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
        try:
            events = selector.select(max(0.0, min(deadlines) - now))
        finally:
            for worker in busy:
                selector.unregister(worker.process.stdout)
        for key, _ in events:
            worker = key.data
            slot = self.workers.index(worker)
            messages = worker.read_lines()
            if messages is None:  # the worker died (e.g. killed by the kernel): the check scores 0.0
                if not worker.ready:
                    raise RuntimeError(
                        "a math verifier worker exited during start-up (try "
                        f"`{sys.executable} -c 'import math_verify'`)"
                    )
                worker.job = None
                self._replace(slot)
                continue
            for message in messages:
                if "fatal" in message:
                    raise RuntimeError(f"math verifier worker cannot start: {message['fatal']}")
                if message.get("ready"):
                    worker.ready = True
                elif worker.job is not None and message.get("id") == worker.job:
                    scores[worker.job] = float(message["score"])
                    worker.job = None
        now = time.monotonic()
        for worker in busy:
            slot = self.workers.index(worker) if worker in self.workers else None
            if slot is None:
                continue
            if worker.ready and worker.job is not None and now >= worker.deadline:
                logger.debug("math check %d overran its limit; restarting its worker", worker.job)
                worker.job = None  # score stays 0.0
                self._replace(slot)
            elif not worker.ready and now >= worker.started_at + _WORKER_STARTUP_LIMIT:
                raise RuntimeError(f"a math verifier worker did not start within {_WORKER_STARTUP_LIMIT} s")

    def close(self) -> None:
        """Stop all workers. Safe to call more than once; the pool restarts workers if used again."""
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the pool: the workers belong to the parent
        for slot, worker in enumerate(self.workers):
            if worker is not None:
                worker.kill()
                self.workers[slot] = None


_POOLS: dict[tuple[str, str], MathVerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(check_file: str, check_name: str) -> MathVerifierPool:
    """The process-wide pool of 2 workers for this check, created on first use, stopped at exit."""
    key = (os.path.abspath(check_file), check_name)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.owner_pid != os.getpid():  # after a fork, start a fresh pool
            pool = _POOLS[key] = MathVerifierPool(*key, workers=2)
            atexit.register(pool.close)
        return pool


# =====================================================================================================
# 2. Code: running an untrusted program against tests, sandboxed
# =====================================================================================================
#
# The threat model is reward hacking by the policy, not only bugs: a program may loop forever, eat
# memory, fork, flood its output, exit early with status 0, print a fake "all tests passed", return an
# object whose `__eq__` always says True, read secrets, write files, open sockets, or leave processes
# behind. The design, in one paragraph:
#
# * One sandboxed child ("runner") per program run, in a fresh temporary directory that is deleted
#   afterwards. The runner is `python -I` (isolated mode) with a scrubbed environment. Its first code
#   is our harness (`_sandbox_main`, shipped into the sandbox as source text), which sets resource
#   limits, drops to a private unprivileged user id, and only then loads the program.
# * Expected outputs never enter the runner, so nothing the program does inside it can fake a pass:
#   - stdin/stdout tests: the trusted parent compares what the program printed;
#   - function-call tests: the runner returns each result as plain JSON data (`_encode_value`
#     refuses anything but exact built-in types, so an `int` subclass with a rigged `__eq__` cannot
#     even be sent) and the parent compares;
#   - HumanEval `check(candidate)`: the benchmark's check runs in a separate trusted "judge" process,
#     outside the sandbox, with `candidate` a proxy that forwards each call to the runner and gets
#     plain data back. The verdict is the judge's, written on the judge's own stdout, which the
#     runner cannot reach.
#   A positive result therefore exists only after the trusted side has seen correct values for every
#   test; `sys.exit(0)`, `os._exit(0)`, killing itself or printing a marker just end the runner early
#   and the missing replies count as failures. (A secret nonce that the harness would print after
#   the tests is not enough on its own: the program shares the harness's process, so it could read
#   the nonce from the same stdin or from the harness's memory and print it first.) What remains
#   possible is what any correct-looking program can do: return the right values, e.g. hard-coded.
# * Isolation: with bubblewrap (`bwrap`) the runner gets a read-only view of the system directories
#   only, its own directory as the sole writable place, a private /tmp, no network, its own PID
#   namespace (everything it spawns dies with it) and dies with its parent. Without bubblewrap the
#   fallback is resource limits + its own process group killed whole + (when we are root) a private
#   unprivileged uid, a private network namespace, and a sweep that kills every process and deletes
#   every file in the shared temp directories owned by that uid.
# * Root ignores RLIMIT_NPROC, so the fork-bomb limit only holds because the runner drops to a uid of
#   its own (a fresh one per concurrent run, so parallel runs and the sweeps never touch each other).
# * Known limit: memory is capped per process (RLIMIT_AS), so a program that forks to its process
#   limit can hold up to `processes * memory_mb` for at most `timeout` seconds. A cgroup would cap the
#   total, but needs set-up this module cannot assume.

CODE_FAILURE_REASONS = ("wrong_answer", "runtime_error", "timeout", "memory", "output_limit")
DEFAULT_CODE_TIMEOUT = 5.0  # wall-clock seconds per test (per whole `check` for HumanEval tests)

_SANDBOX_ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SANDBOX_ETC_FILES = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")
_WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass
class TestOutcome:
    """The result of one test: `reason` is "passed", one of CODE_FAILURE_REASONS, or "skipped"
    (with `fail_fast`, after an earlier failure)."""

    __test__ = False  # not a pytest test class despite the name
    passed: bool
    reason: str
    detail: str = ""


@dataclass
class TestReport:
    """What `run_tests` found: how many tests passed and why the others failed.

    `sandbox` is "bwrap" or "rlimit"; `uid` (the private user id of the last run, None when the
    program ran as the calling user) and `workdirs` are diagnostics, e.g. to check nothing is left.
    """

    __test__ = False  # not a pytest test class despite the name
    passed: int
    total: int
    outcomes: list[TestOutcome]
    sandbox: str
    uid: int | None = None
    workdirs: list[str] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def failures(self) -> dict[str, int]:
        """Number of failed tests per reason, e.g. {"timeout": 1, "wrong_answer": 2}."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            if not outcome.passed:
                counts[outcome.reason] = counts.get(outcome.reason, 0) + 1
        return counts


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one runner. `timeout` is wall-clock seconds per test."""

    timeout: float = DEFAULT_CODE_TIMEOUT
    memory_mb: int = 512  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # stdout + stderr (+ replies) the parent accepts before killing it
    file_bytes: int = 16 << 20  # the largest file it may write (RLIMIT_FSIZE)
    processes: int = 16  # processes + threads of its private uid (RLIMIT_NPROC)
    open_files: int = 64  # RLIMIT_NOFILE

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_AS": self.memory_mb << 20,
            "RLIMIT_CPU": math.ceil(self.timeout) + 1,  # a backstop; the wall clock is the real limit
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_CORE": 0,
        }


# ----------------------------------------------------------------------------------------------------
# 2a. Values that cross the sandbox boundary: plain data only
# ----------------------------------------------------------------------------------------------------
# These two functions also run inside the sandbox and the judge (shipped as source text), so they only
# use built-ins. JSON has no tuples, sets, dicts with non-string keys or bytes; those get a one-key
# object tag. Exact type checks (`type(x) is int`) refuse subclasses, which is how a rigged `__eq__`
# is stopped before it leaves the runner.


def _encode_value(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_encode_value(item) for item in value]
    if kind is tuple:
        return {"tuple": [_encode_value(item) for item in value]}
    if kind in (set, frozenset):
        return {kind.__name__: [_encode_value(item) for item in value]}
    if kind is dict:
        return {"dict": [[_encode_value(k), _encode_value(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"unsupported value of type {kind.__name__} (only plain built-in data is accepted)")


def _decode_value(data):
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [_decode_value(item) for item in data]
    if type(data) is dict and len(data) == 1:
        ((tag, payload),) = data.items()
        if tag == "tuple":
            return tuple(_decode_value(item) for item in payload)
        if tag == "set":
            return {_decode_value(item) for item in payload}
        if tag == "frozenset":
            return frozenset(_decode_value(item) for item in payload)
        if tag == "dict":
            return {_decode_value(k): _decode_value(v) for k, v in payload}
        if tag == "bytes":
            return bytes.fromhex(payload)
        if tag == "complex":
            return complex(payload[0], payload[1])
    raise ValueError(f"malformed encoded value: {str(data)[:100]}")


def _values_match(actual, expected) -> bool:
    """Compare a decoded result with an expected value (both plain data, so `==` cannot be rigged).

    Numbers compare with a small tolerance (relative 1e-6, absolute 1e-9); lists and tuples compare
    element-wise with each other (JSON test files cannot write tuples); bools only equal bools.
    """
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if isinstance(expected, int) and isinstance(actual, int):
            return actual == expected
        return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(map(_values_match, actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(_values_match(actual[k], expected[k]) for k in expected)
    return type(actual) is type(expected) and actual == expected


def _outputs_match(actual: str, expected: str) -> bool:
    """Compare stdout with the expected output line by line.

    Trailing whitespace on each line and trailing blank lines are ignored; tokens that both read as
    finite numbers compare with a small tolerance (relative 1e-6, absolute 1e-9), others exactly.
    """
    actual_lines = [line.rstrip() for line in actual.rstrip().split("\n")]
    expected_lines = [line.rstrip() for line in expected.rstrip().split("\n")]
    if len(actual_lines) != len(expected_lines):
        return False
    for got_line, want_line in zip(actual_lines, expected_lines):
        if got_line == want_line:
            continue
        got, want = got_line.split(), want_line.split()
        if len(got) != len(want):
            return False
        for a, b in zip(got, want):
            if a != b and not _numbers_close(a, b):
                return False
    return True


def _numbers_close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isfinite(x) and math.isfinite(y) and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------------
# 2b. Code that runs inside the sandbox (the harness) and in the judge, shipped as source text
# ----------------------------------------------------------------------------------------------------


def _sandbox_unshare_network() -> None:
    """Fallback mode as root: move the runner into a fresh network namespace (loopback only, down)."""
    import ctypes

    CLONE_NEWNET = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")


def _sandbox_main() -> None:
    """The harness: the first code the runner executes. Limits, privilege drop, then the program.

    argv[1] is a JSON config: mode ("script" for stdin/stdout tests, "calls" for function calls),
    rlimits, uid (or None) and whether to unshare the network. Nothing in it is secret or expected.
    """
    import json
    import os
    import resource
    import sys

    config = json.loads(sys.argv[1])
    if config["unshare_net"]:
        _sandbox_unshare_network()
    for name, limit in config["rlimits"].items():
        soft = hard = limit
        if name == "RLIMIT_CPU":
            hard = limit + 1  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if config["uid"] is not None:  # irreversible: from here on the process has no privileges at all
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    os.chdir(config["cwd"])  # only now: the directory belongs to the uid and is closed to others
    with open(config["program"], encoding="utf-8") as handle:
        source = handle.read()
    if config["mode"] == "script":
        sys.argv = [config["program"]]
        namespace = {"__name__": "__main__", "__file__": config["program"], "__builtins__": __builtins__}
        exec(compile(source, config["program"], "exec"), namespace)
        return  # a normal exit: Python flushes output and waits for non-daemon threads
    _sandbox_serve_calls(source, config["program"])


def _sandbox_serve_calls(source: str, program_name: str) -> None:
    """Function-call mode: load the program, then answer call requests with encoded results.

    The protocol (JSON lines) uses the original stdin/stdout; the program itself sees /dev/null as
    stdin and our stderr as stdout, so its prints cannot mix with replies. The program could still
    write to the protocol pipe - but all it can send is values, and values are judged outside.
    """
    import json
    import os

    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)

    def reply(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    def describe(error):
        try:
            return f"{type(error).__name__}: {error}"[:500]
        except BaseException:
            return type(error).__name__

    namespace = {"__name__": "solution", "__file__": program_name, "__builtins__": __builtins__}
    try:
        exec(compile(source, program_name, "exec"), namespace)
    except BaseException as error:  # SystemExit included: exiting while loading is a failure
        reply({"loaded": False, "error": describe(error)})
        os._exit(0)
    reply({"loaded": True})
    for line in requests:
        request = json.loads(line)
        message = {"id": request["id"], "ok": False}
        try:
            function = namespace[request["call"]]
            kwargs = _decode_value(request["kwargs"]) if "kwargs" in request else {}
            result = function(*_decode_value(request["args"]), **kwargs)
        except BaseException as error:  # SystemExit from sys.exit() in the function: a failure too
            message["error"] = describe(error)
        else:
            try:
                message.update(ok=True, value=_encode_value(result))
            except BaseException as error:
                message.update(ok=False, error=describe(error), unsupported=True)
        reply(message)
    os._exit(0)


def _judge_main() -> None:
    """The trusted judge of HumanEval-style tests; runs outside the sandbox, never runs the program.

    Reads {"setup", "check", "entry_point", "max_line"} on stdin, runs `setup` (the benchmark prompt,
    which may define helpers the check uses), then the check, then `check(candidate)` where each call
    of `candidate` is sent to the runner (fds argv[1] -> requests, argv[2] <- replies). Writes one
    JSON verdict on its stdout. The check's own prints go to stderr.
    """
    import json
    import os
    import sys

    verdict_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = json.loads(sys.stdin.read())
    to_runner = os.fdopen(int(sys.argv[1]), "wb")
    from_runner = os.fdopen(int(sys.argv[2]), "rb")

    def finish(passed, reason, detail=""):
        verdict_out.write(json.dumps({"passed": passed, "reason": reason, "detail": detail[:500]}) + "\n")
        verdict_out.flush()
        os._exit(0)

    def receive():
        line = from_runner.readline(job["max_line"])
        if not line:
            finish(False, "runner_exited", "the program's process ended before answering")
        if not line.endswith(b"\n"):
            finish(False, "output_limit", "a reply exceeded the output limit")
        try:
            return json.loads(line)
        except ValueError:
            finish(False, "wrong_answer", "the program wrote garbage on the reply channel")

    loaded = receive()
    if not loaded.get("loaded"):
        finish(False, "runtime_error", f"loading the program failed: {loaded.get('error', '')}")

    class CandidateFailed(Exception):
        pass

    calls = [0]

    def candidate(*args, **kwargs):
        calls[0] += 1
        request = {"id": calls[0], "call": job["entry_point"], "args": _encode_value(list(args))}
        if kwargs:
            request["kwargs"] = _encode_value(kwargs)
        to_runner.write(json.dumps(request).encode() + b"\n")
        to_runner.flush()
        reply = receive()
        if reply.get("id") != calls[0]:
            raise CandidateFailed("protocol: reply out of order")
        if not reply.get("ok"):
            raise CandidateFailed(reply.get("error", "?"), bool(reply.get("unsupported")))
        return _decode_value(reply["value"])

    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["setup"], "setup", "exec"), namespace)
        # In HumanEval the program defines the entry point, so a check that names it directly
        # (HumanEval/33 calls `sort_third` itself) means the program's function: the proxy.
        namespace[job["entry_point"]] = candidate
        exec(compile(job["check"], "check", "exec"), namespace)
        namespace["check"](candidate)
    except CandidateFailed as failure:
        message = str(failure.args[0])
        if len(failure.args) > 1 and failure.args[1]:
            finish(False, "wrong_answer", message)
        finish(False, "memory" if message.startswith("MemoryError") else "runtime_error", message)
    except AssertionError as error:
        finish(False, "wrong_answer", f"assertion failed {error}".strip())
    except BaseException as error:  # e.g. the check compared None with a number: a wrong answer
        finish(False, "wrong_answer", f"{type(error).__name__}: {error}")
    finish(True, "passed", f"{calls[0]} calls")


def _source_of(*functions, entry: str) -> str:
    """Python source text made of the given functions plus a call of `entry`, for `python -c`."""
    import inspect
    import textwrap

    parts = [textwrap.dedent(inspect.getsource(function)) for function in functions]
    return "\n\n".join(parts) + f"\n\n{entry}()\n"


# ----------------------------------------------------------------------------------------------------
# 2c. Choosing the sandbox: bubblewrap or the rlimit fallback, an interpreter, a private uid
# ----------------------------------------------------------------------------------------------------

_SANDBOX_CACHE: dict[str, object] = {}
_SANDBOX_LOCK = threading.Lock()


def _base_interpreter() -> str:
    """The real interpreter behind a virtual environment (the runner needs only the stdlib)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _bwrap_usable() -> bool:
    """True if `bwrap` is on PATH and can actually start a sandbox here (cached)."""
    with _SANDBOX_LOCK:
        if "bwrap" not in _SANDBOX_CACHE:
            usable = False
            if shutil.which("bwrap"):
                with tempfile.TemporaryDirectory(prefix="treerl-probe-") as box:
                    probe = subprocess.run(
                        _bwrap_command(_base_interpreter(), box=box, tmp=None) + ["-I", "-c", "pass"],
                        capture_output=True,
                        timeout=60,
                    )
                usable = probe.returncode == 0
                if not usable:
                    logger.warning(
                        "bwrap is installed but cannot start a sandbox here: %s",
                        probe.stderr.decode(errors="replace").strip()[:300],
                    )
            _SANDBOX_CACHE["bwrap"] = usable
        return bool(_SANDBOX_CACHE["bwrap"])


def _announce(mode: str, message: str) -> None:
    """Log which sandbox is active, once per mode and process."""
    with _SANDBOX_LOCK:
        if _SANDBOX_CACHE.get(f"announced {mode}"):
            return
        _SANDBOX_CACHE[f"announced {mode}"] = True
    (logger.info if mode == "bwrap" else logger.warning)(message)


def _resolve_mode(sandbox: str) -> str:
    """ "auto" (or the TREERL_SANDBOX environment variable) -> "bwrap" where usable, else "rlimit"."""
    if sandbox == "auto":
        sandbox = os.environ.get("TREERL_SANDBOX", "auto") or "auto"
    if sandbox not in ("auto", "bwrap", "rlimit"):
        raise ValueError(f"sandbox must be 'auto', 'bwrap' or 'rlimit', got {sandbox!r}")
    if sandbox in ("auto", "bwrap") and _bwrap_usable():
        _announce("bwrap", "code sandbox: bubblewrap (read-only system, private /tmp, no network, own PID namespace)")
        return "bwrap"
    if sandbox == "bwrap":
        raise RuntimeError("sandbox='bwrap' was requested but bubblewrap is not installed or not usable")
    _announce(
        "rlimit",
        "code sandbox: rlimit fallback ("
        + ("requested" if sandbox == "rlimit" else "no usable bubblewrap")
        + "): resource limits, own process "
        "group"
        + (
            ", private uid and network namespace"
            if os.geteuid() == 0
            else "; not root, so no private uid: install bubblewrap for real isolation"
        ),
    )
    return "rlimit"


def _uid_range() -> tuple[int, int]:
    """A block of 4096 user ids for sandbox runs, inside this user namespace's uid map."""
    try:
        with open("/proc/self/uid_map") as handle:
            count = max(int(line.split()[2]) for line in handle if line.split()[0] == "0")
    except (OSError, ValueError, IndexError):
        count = 65536
    if count > 2_000_100_000:
        return 2_000_000_000, 4096  # far above any real account
    return max(1000, count - 5000), 4096  # the top of a small map, below 65534 (nobody)


def _allocate_uid() -> tuple[int, socket.socket]:
    """Reserve a uid no other run (in any process on this machine) is using.

    The reservation is an abstract Unix socket named after the uid: binding fails if another run
    holds it, and the kernel releases it when the holder exits, so there is no lock file to clean.
    """
    base, size = _uid_range()
    start = random.randrange(size)
    for attempt in range(size):
        uid = base + (start + attempt) % size
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            holder.bind(f"\0treerl-sandbox-uid-{uid}")
            return uid, holder
        except OSError:
            holder.close()
    raise RuntimeError("no free sandbox uid (4096 concurrent runs?)")


def _interpreter_for(uid: int | None) -> str | None:
    """An interpreter that `uid` can execute (rlimit mode drops to it before the program imports).

    Our own may live under a private home directory (e.g. /root/.pyenv): try it, then the system's.
    """
    if uid is None:
        return _base_interpreter()
    with _SANDBOX_LOCK:
        if "interpreter" not in _SANDBOX_CACHE:
            chosen = None
            for candidate in (_base_interpreter(), "/usr/bin/python3", "/usr/local/bin/python3"):
                if not os.path.exists(candidate):
                    continue
                try:
                    probe = subprocess.run(
                        [candidate, "-I", "-c", "import json, heapq, collections"],
                        user=uid,
                        group=uid,
                        extra_groups=[],
                        cwd="/",
                        capture_output=True,
                        timeout=60,
                    )
                except (OSError, subprocess.SubprocessError):  # e.g. not executable by that uid
                    continue
                if probe.returncode == 0:
                    chosen = candidate
                    break
            if chosen is None:
                logger.warning(
                    "no Python interpreter is usable by an unprivileged uid; the rlimit "
                    "sandbox will run programs as root (install bubblewrap)"
                )
            _SANDBOX_CACHE["interpreter"] = chosen
        return _SANDBOX_CACHE["interpreter"]


def _bwrap_command(python: str, box: str, tmp: str | None) -> list[str]:
    """The bubblewrap command line; the harness command follows it.

    --unshare-all would also create a user namespace, in which the harness could not switch to its
    private uid; so the namespaces are listed one by one: IPC, PID, network, UTS, cgroup.
    """
    command = [
        "bwrap",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    if os.geteuid() == 0:  # keep just what the harness needs to switch to its uid, then it has none
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    bound: list[str] = []
    for path in _SANDBOX_ROOT_DIRS:
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
            bound.append(path)
    for path in _SANDBOX_ETC_FILES:
        if os.path.exists(path):
            command += ["--ro-bind", path, path]
    # The interpreter's installation (e.g. /root/.pyenv/versions/3.11.7), read-only, if it is not
    # under /usr already. bwrap would create the missing parent directories with mode 0700, which the
    # program's uid could not traverse, so they are created explicitly with 0755.
    prefixes = {os.path.dirname(os.path.dirname(python)), sys.base_prefix, sys.base_exec_prefix}
    for prefix in sorted(prefixes):
        if any(prefix == b or prefix.startswith(b + "/") for b in bound) or not os.path.isdir(prefix):
            continue
        parents = []
        parent = os.path.dirname(prefix)
        while parent not in ("/", ""):
            parents.insert(0, parent)
            parent = os.path.dirname(parent)
        for parent in parents:
            command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", prefix, prefix]
        bound.append(prefix)
    command += ["--proc", "/proc", "--dev", "/dev", "--bind", box, "/sandbox"]
    if tmp is not None:
        command += ["--bind", tmp, "/tmp"]
    command += [
        "--chdir",
        "/",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/sandbox",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        python,
    ]
    return command


# ----------------------------------------------------------------------------------------------------
# 2d. One sandboxed run: prepare, launch, watch (deadline + output cap), clean up
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one runner owns, so that `_clean_up` can remove all of it."""

    mode: str  # "bwrap" or "rlimit"
    limits: SandboxLimits
    workdir: str  # root-owned; holds box/ (the program's directory), tmp/ and stdin.txt
    uid: int | None
    uid_holder: socket.socket | None
    processes: list = field(default_factory=list)

    @property
    def box(self) -> str:
        return os.path.join(self.workdir, "box")


def _prepare_run(program: str, mode: str, limits: SandboxLimits) -> _Run:
    """Reserve a private uid (when root) and make the run's directories with the program in them."""
    uid, holder = _allocate_uid() if os.geteuid() == 0 else (None, None)
    if mode == "rlimit" and uid is not None and _interpreter_for(uid) is None:
        holder.close()
        uid, holder = None, None
    run = _Run(mode, limits, tempfile.mkdtemp(prefix="treerl-code-"), uid, holder)
    try:
        os.chmod(run.workdir, 0o711)  # the uid may enter box/ but not list or read the rest
        for name in ("box", "tmp"):
            os.mkdir(os.path.join(run.workdir, name), 0o700)
        with open(os.path.join(run.box, "solution.py"), "w", encoding="utf-8") as handle:
            handle.write(program)
        if uid is not None:
            for path in (run.box, os.path.join(run.workdir, "tmp"), os.path.join(run.box, "solution.py")):
                os.chown(path, uid, uid)
            _kill_uid_processes(uid)  # leftovers of a crashed earlier holder of this uid, if any
    except BaseException:
        _clean_up(run)
        raise
    return run


@functools.cache
def _harness_source() -> str:
    return _source_of(
        _encode_value,
        _decode_value,
        _sandbox_unshare_network,
        _sandbox_serve_calls,
        _sandbox_main,
        entry="_sandbox_main",
    )


@functools.cache
def _judge_source() -> str:
    return _source_of(_encode_value, _decode_value, _judge_main, entry="_judge_main")


def _process_count_of(uid: int) -> int:
    """Processes and threads owned by `uid` (for RLIMIT_NPROC when we cannot switch uid)."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _owner_of(pid) == uid:
            try:
                count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return count


def _launch(run: _Run, kind: str, stdin, stdout) -> subprocess.Popen:
    """Start the runner for `kind` ("script" or "calls") in its own process group."""
    rlimits = run.limits.rlimits()
    if run.uid is None and os.geteuid() == 0:
        del rlimits["RLIMIT_NPROC"]  # root without a private uid: the kernel ignores it anyway
    elif run.uid is None:  # it counts every process of our user, so leave room for those
        rlimits["RLIMIT_NPROC"] += _process_count_of(os.getuid())
    config = {
        "mode": kind,
        "rlimits": rlimits,
        "uid": run.uid,
        "program": "solution.py",
        "cwd": "/sandbox" if run.mode == "bwrap" else run.box,
        "unshare_net": run.mode == "rlimit" and os.geteuid() == 0,
    }
    tail = ["-I", "-c", _harness_source(), json.dumps(config)]
    if run.mode == "bwrap":
        command = _bwrap_command(_base_interpreter(), run.box, os.path.join(run.workdir, "tmp")) + tail
        env = {}
    else:
        command = [_interpreter_for(run.uid)] + tail
        env = {"PATH": "/usr/bin:/bin", "HOME": run.box, "TMPDIR": os.path.join(run.workdir, "tmp"), "LANG": "C.UTF-8"}
    process = subprocess.Popen(
        command,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=run.workdir,
        env=env,
        process_group=0,
        close_fds=True,
    )
    run.processes.append(process)
    return process


def _owner_of(pid: str) -> int | None:
    """Real uid of a live process, from /proc/<pid>/status; None for a zombie or a vanished pid.

    (The owner of the /proc/<pid> directory is not reliable: a process that switched uid is not
    "dumpable" and its /proc entries belong to root. Zombies are skipped: they hold no resources,
    cannot be killed and are reaped by init.)
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                    return None
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kill_uid_processes(uid: int) -> None:
    """SIGKILL every process of `uid` until none is left (this catches a `setsid` daemon that left
    the process group; RLIMIT_NPROC bounds how many a fork bomb can make in between rounds)."""
    for _ in range(200):
        victims = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _owner_of(pid) == uid]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
    logger.warning("processes of sandbox uid %d survived 200 kill rounds", uid)


def _remove_uid_files(uid: int) -> None:
    """Delete what `uid` created in the shared world-writable directories (rlimit mode only)."""
    for directory in _WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _clean_up(run: _Run) -> None:
    """Kill the runner's process groups and every process of its uid, delete its files, free the uid."""
    for process in run.processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    for process in run.processes:
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
    if run.uid is not None:
        _kill_uid_processes(run.uid)
        if run.mode == "rlimit":
            _remove_uid_files(run.uid)
    shutil.rmtree(run.workdir, onerror=_make_writable_and_retry)
    if run.uid_holder is not None:
        run.uid_holder.close()


def _make_writable_and_retry(function, path, _exc_info) -> None:
    """rmtree helper: a program may have removed write permission from its own files."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)
    except OSError:
        pass


class _Streams:
    """Read several pipes at once, under a deadline and a shared byte cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self.data: dict[str, bytes] = {}
        self.selector = selectors.DefaultSelector()
        self.open: set[str] = set()

    def add(self, name: str, pipe) -> None:
        self.data[name] = b""
        self.open.add(name)
        self.selector.register(pipe, selectors.EVENT_READ, name)

    def _read(self, events) -> bool:
        """Read from the pipes that are ready; True once more than `cap` bytes arrived in total."""
        for key, _ in events:
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:  # end of file
                self.selector.unregister(key.fileobj)
                self.open.discard(key.data)
                continue
            self.data[key.data] += chunk
            self.total += len(chunk)
        return self.total > self.cap

    def pump(self, deadline: float, until) -> str:
        """Read until `until()` is true ("done"), all pipes close ("eof"), the deadline passes
        ("timeout") or more than `cap` bytes arrived ("output_limit")."""
        while not until():
            if not self.open:
                return "eof"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if self._read(self.selector.select(min(remaining, 0.05))):
                return "output_limit"
        return "done"

    def finish(self, process, status: str, deadline: float) -> str:
        """After `pump`: if the process exited or closed its pipes, wait for its exit (until the
        deadline) and collect what is still in the pipes (briefly: a stray daemon may hold them
        open). Returns the final status."""
        if status not in ("done", "eof"):
            return status
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return "timeout"
        return self.drain()

    def drain(self) -> str:
        """Read what is already in the pipes without waiting for more. After a process exited, all
        its output is buffered; anything later could only come from a stray descendant."""
        while self.open:
            events = self.selector.select(0)
            if not events:
                break
            if self._read(events):
                return "output_limit"
        return "done"

    def take_line(self, name: str) -> bytes | None:
        """Remove and return the first complete line read from `name`, if any."""
        line, newline, rest = self.data[name].partition(b"\n")
        if not newline:
            return None
        self.data[name] = rest
        return line

    def close(self) -> None:
        self.selector.close()


def _write_all(pipe, data: bytes, deadline: float) -> bool:
    """Write to a pipe without ever blocking past `deadline` (the reader may be hostile)."""
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return False
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError:  # the reader is gone
                return False
    return True


def _failure_reason(returncode: int | None, stderr: bytes) -> tuple[str, str]:
    """Why a runner that did not pass ended the way it did: (reason, detail)."""
    tail = stderr[-3000:].decode("utf-8", errors="replace")
    last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
    if "MemoryError" in tail:
        return "memory", last_line
    signal_number = 0
    if returncode is not None and returncode < 0:
        signal_number = -returncode
    elif returncode is not None and returncode > 128:  # bwrap reports a signal as 128 + number
        signal_number = returncode - 128
    if signal_number == signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if signal_number == signal.SIGXFSZ:
        return "output_limit", "file size limit"
    if signal_number:
        return "runtime_error", f"killed by signal {signal.Signals(signal_number).name}"
    return "runtime_error", last_line or f"exit status {returncode}"


def _run_script_test(program: str, test: dict, mode: str, limits: SandboxLimits) -> tuple[TestOutcome, _Run]:
    """A stdin/stdout test: run the program as a script and compare its output here."""
    run = _prepare_run(program, mode, limits)
    streams = _Streams(limits.output_bytes)
    try:
        stdin_path = os.path.join(run.workdir, "stdin.txt")
        with open(stdin_path, "w", encoding="utf-8") as handle:
            handle.write(test["input"])
        with open(stdin_path, "rb") as stdin:
            process = _launch(run, "script", stdin=stdin, stdout=subprocess.PIPE)
        streams.add("out", process.stdout)
        streams.add("err", process.stderr)
        deadline = time.monotonic() + limits.timeout
        status = streams.pump(deadline, until=lambda: process.poll() is not None)
        status = streams.finish(process, status, deadline)
        if status != "done":
            return TestOutcome(False, status, f"limit: {limits.timeout:g} s / {limits.output_bytes} bytes"), run
        if process.returncode != 0:
            reason, detail = _failure_reason(process.returncode, streams.data["err"])
            return TestOutcome(False, reason, detail), run
        output = streams.data["out"].decode("utf-8", errors="replace")
        if _outputs_match(output, test["output"]):
            return TestOutcome(True, "passed"), run
        return TestOutcome(False, "wrong_answer", f"got {output[:200]!r}"), run
    finally:
        streams.close()
        _clean_up(run)


def _reply_outcome(reply: dict, expected) -> TestOutcome:
    """Judge one function-call reply against the expected value (here, outside the sandbox)."""
    if not reply.get("ok"):
        error = str(reply.get("error", ""))
        if reply.get("unsupported"):
            return TestOutcome(False, "wrong_answer", error)
        return TestOutcome(False, "memory" if error.startswith("MemoryError") else "runtime_error", error)
    try:
        actual = _decode_value(reply["value"])
    except (ValueError, TypeError, KeyError) as error:
        return TestOutcome(False, "wrong_answer", f"malformed reply: {error}")
    if _values_match(actual, expected):
        return TestOutcome(True, "passed")
    return TestOutcome(False, "wrong_answer", f"got {str(actual)[:200]}")


def _run_call_tests(
    program: str, tests: list[dict], mode: str, limits: SandboxLimits
) -> tuple[list[TestOutcome], _Run]:
    """Function-call tests: one runner answers every call; expected values stay here."""
    run = _prepare_run(program, mode, limits)
    streams = _Streams(limits.output_bytes)
    outcomes: list[TestOutcome] = []

    def next_reply(deadline: float) -> dict | str:
        status = streams.pump(deadline, until=lambda: b"\n" in streams.data["replies"])
        if status != "done":
            return status
        try:
            return json.loads(streams.take_line("replies"))
        except ValueError:
            return "garbled"

    def failure_for(status: str) -> TestOutcome:
        if status in ("timeout", "output_limit"):
            return TestOutcome(False, status, "")
        if status == "garbled":
            return TestOutcome(False, "wrong_answer", "the program wrote garbage on the reply channel")
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        reason, detail = _failure_reason(process.returncode, streams.data["err"])
        return TestOutcome(False, reason, detail or "the program's process ended early")

    try:
        process = _launch(run, "calls", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        streams.add("replies", process.stdout)
        streams.add("err", process.stderr)
        loaded = next_reply(time.monotonic() + limits.timeout)
        if not isinstance(loaded, dict) or not loaded.get("loaded"):
            failure = (
                failure_for(loaded)
                if not isinstance(loaded, dict)
                else TestOutcome(False, "runtime_error", f"loading failed: {loaded.get('error', '')}")
            )
            return [failure] * len(tests), run
        for index, test in enumerate(tests):
            deadline = time.monotonic() + limits.timeout
            request = {"id": index, "call": test["call"], "args": _encode_value(list(test.get("args", [])))}
            if test.get("kwargs"):
                request["kwargs"] = _encode_value(dict(test["kwargs"]))
            if not _write_all(process.stdin, json.dumps(request).encode() + b"\n", deadline):
                reply = "eof" if process.poll() is not None else "timeout"
            else:
                reply = next_reply(deadline)
            if isinstance(reply, dict) and reply.get("id") == index:
                outcomes.append(_reply_outcome(reply, test["expected"]))
                continue
            failure = failure_for(reply if not isinstance(reply, dict) else "garbled")
            outcomes.append(failure)
            skipped = TestOutcome(False, failure.reason, "not run: an earlier call ended the program")
            outcomes.extend([skipped] * (len(tests) - len(outcomes)))
            break
        return outcomes, run
    finally:
        streams.close()
        _clean_up(run)


def _run_check_test(program: str, test: dict, mode: str, limits: SandboxLimits) -> tuple[TestOutcome, _Run]:
    """A HumanEval-style test: the trusted judge runs `check(candidate)`, the runner answers calls."""
    run = _prepare_run(program, mode, limits)
    streams = _Streams(limits.output_bytes)
    pipes = []
    try:
        to_runner_r, to_runner_w = os.pipe()
        from_runner_r, from_runner_w = os.pipe()
        pipes = [to_runner_r, to_runner_w, from_runner_r, from_runner_w]
        runner = _launch(run, "calls", stdin=to_runner_r, stdout=from_runner_w)
        judge = subprocess.Popen(
            [sys.executable, "-I", "-c", _judge_source(), str(to_runner_w), str(from_runner_r)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_runner_w, from_runner_r),
            process_group=0,
            cwd=run.workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        run.processes.append(judge)
        for fd in pipes:  # only the runner and the judge hold the ends now, so EOF means "gone"
            os.close(fd)
        pipes = []
        deadline = time.monotonic() + limits.timeout
        job = {
            "setup": test.get("setup", ""),
            "check": test["check"],
            "entry_point": test["entry_point"],
            "max_line": limits.output_bytes,
        }
        _write_all(judge.stdin, json.dumps(job).encode(), deadline)
        judge.stdin.close()
        streams.add("verdict", judge.stdout)
        streams.add("err", runner.stderr)
        status = streams.pump(deadline, until=lambda: judge.poll() is not None)
        status = streams.finish(judge, status, deadline)
        if status != "done":
            return TestOutcome(False, status, f"limit: {limits.timeout:g} s / {limits.output_bytes} bytes"), run
        try:
            verdict = json.loads(streams.data["verdict"].decode())
        except ValueError:
            return TestOutcome(False, "runtime_error", "the judge gave no verdict"), run
        if verdict["reason"] == "runner_exited":
            try:
                runner.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            reason, detail = _failure_reason(runner.returncode, streams.data["err"])
            return TestOutcome(False, reason, detail or verdict["detail"]), run
        return TestOutcome(bool(verdict["passed"]), verdict["reason"], verdict.get("detail", "")), run
    finally:
        for fd in pipes:
            os.close(fd)
        streams.close()
        _clean_up(run)


# ----------------------------------------------------------------------------------------------------
# 2e. The public code API
# ----------------------------------------------------------------------------------------------------


def _test_kind(test: dict, index: int) -> str:
    if not isinstance(test, dict):
        raise ValueError(f"test {index} must be a dict, got {type(test).__name__}")
    if "input" in test and "output" in test:
        if not isinstance(test["input"], str) or not isinstance(test["output"], str):
            raise ValueError(f"test {index}: 'input' and 'output' must be strings")
        return "stdio"
    if "call" in test and "expected" in test:
        if not isinstance(test["call"], str) or not isinstance(test.get("args", []), (list, tuple)):
            raise ValueError(f"test {index}: 'call' must be a function name and 'args' a list")
        return "call"
    if "check" in test and "entry_point" in test:
        return "check"
    raise ValueError(
        f"test {index} has keys {sorted(test)}; expected {{'input', 'output'}} (stdin/stdout), "
        "{'call', 'args', 'expected'} (function call) or {'check', 'entry_point'[, 'setup']} (HumanEval)"
    )


def run_tests(
    program: str,
    tests: list[dict],
    *,
    timeout: float = DEFAULT_CODE_TIMEOUT,
    memory_mb: int = 512,
    sandbox: str = "auto",
    fail_fast: bool = False,
    limits: SandboxLimits | None = None,
) -> TestReport:
    """Run `program` against `tests` in the sandbox; say how many passed and why the others failed.

    Test kinds (they may be mixed):
      {"input": "1 2\\n", "output": "3\\n"}                     stdin/stdout, one run per test
      {"call": "add", "args": [1, 2], "expected": 3}           function call, one run for all calls
      {"check": "def check(candidate): ...", "entry_point": "add", "setup": prompt}   HumanEval
    `timeout` is wall-clock seconds per test (per call; per whole `check`). `sandbox` is "auto"
    (bubblewrap when usable, else the rlimit fallback; the TREERL_SANDBOX environment variable can
    force either), "bwrap" or "rlimit". With `fail_fast`, tests after the first failure are not run
    and are reported as "skipped".
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not tests:
        raise ValueError("run_tests needs at least one test (an empty test list would pass anything)")
    kinds = [_test_kind(test, index) for index, test in enumerate(tests)]
    limits = limits or SandboxLimits(timeout=timeout, memory_mb=memory_mb)
    if limits.timeout <= 0:
        raise ValueError(f"timeout must be positive, got {limits.timeout}")
    mode = _resolve_mode(sandbox)
    outcomes: list[TestOutcome | None] = [None] * len(tests)
    runs: list[_Run] = []
    call_indices = [i for i, kind in enumerate(kinds) if kind == "call"]
    if call_indices:
        call_outcomes, run = _run_call_tests(program, [tests[i] for i in call_indices], mode, limits)
        runs.append(run)
        for index, outcome in zip(call_indices, call_outcomes):
            outcomes[index] = outcome
    for index, kind in enumerate(kinds):
        if kind == "call":
            continue
        if fail_fast and any(o is not None and not o.passed for o in outcomes):
            outcomes[index] = TestOutcome(False, "skipped", "an earlier test failed")
            continue
        runner = _run_script_test if kind == "stdio" else _run_check_test
        outcomes[index], run = runner(program, tests[index], mode, limits)
        runs.append(run)
    passed = sum(outcome.passed for outcome in outcomes)
    return TestReport(
        passed=passed,
        total=len(tests),
        outcomes=list(outcomes),
        sandbox=mode,
        uid=runs[-1].uid if runs else None,
        workdirs=[run.workdir for run in runs],
    )
