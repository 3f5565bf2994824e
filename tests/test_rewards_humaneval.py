"""sandbox.run_tests on the public HumanEval copy: canonical solutions pass, broken ones fail."""

import gzip
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sandbox as sandboxing

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "HumanEval.jsonl.gz"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="shared HumanEval copy not present")


def problems():
    with gzip.open(DATA, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def without_last_return(solution: str) -> str:
    """The canonical solution with its last `return ...` line removed."""
    lines = solution.rstrip("\n").split("\n")
    last = max(i for i, line in enumerate(lines) if line.strip().startswith("return"))
    return "\n".join(lines[:last] + lines[last + 1 :]) + "\n"


def check_problem(problem: dict, sandbox: str) -> tuple[str, str, str]:
    """(task id, outcome of the canonical solution, outcome of the broken one)."""
    test = {"check": problem["test"], "entry_point": problem["entry_point"], "setup": problem["prompt"]}
    good = sandboxing.run_tests(problem["prompt"] + problem["canonical_solution"], [test], sandbox=sandbox, timeout=10)
    bad = sandboxing.run_tests(
        problem["prompt"] + without_last_return(problem["canonical_solution"]), [test], sandbox=sandbox, timeout=10
    )
    return problem["task_id"], good.outcomes[0].reason, bad.outcomes[0].reason


def sweep(selected: list[dict], sandbox: str) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda problem: check_problem(problem, sandbox), selected))
    canonical_failures = [(task, good) for task, good, _ in results if good != "passed"]
    broken_passes = [task for task, _, bad in results if bad == "passed"]
    assert not canonical_failures, canonical_failures
    assert not broken_passes, broken_passes


def test_all_164_canonical_solutions_pass_and_broken_ones_fail(code_sandbox):
    """The whole benchmark with the default sandbox (bubblewrap; the rlimit mode, opted in, where
    bubblewrap is not usable): ~20 s on 2 cores."""
    selected = problems()
    assert len(selected) == 164
    sweep(selected, "auto")


def test_sample_in_the_rlimit_mode():
    sweep(random.Random(0).sample(problems(), 20), "rlimit")
