"""Throughput of the verifiers in rewards.py on this machine.

    python -m eval.verifier_throughput [--math-checks 500] [--code-runs 40] [--repeats 3]

Prints a Markdown table and writes results/verifier_throughput.json with:
  * math checks per second through the pool of 2 workers (MATH500 gold solutions against their
    answers when ../shared/data is present, else generated fractions), after warm-up;
  * code runs per second (one program, one stdin/stdout test, one sandbox each) with 2 runs in
    flight, for each sandbox mode available (bubblewrap, rlimit fallback), plus HumanEval-style
    `check(candidate)` runs (judge + runner per run);
  * median and worst latency of each pathological math input (each repeated), which must stay
    within the per-check limit.
These are measurements, not tests: the test suite asserts behaviour only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import string
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rewards
import sandbox

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

PATHOLOGICAL = {
    "10^(10^10)": r"\boxed{10^{10^{10}}}",
    "9^(9^(9^9))": r"\boxed{9^{9^{9^{9}}}}",
    "100k-character garbage": r"\boxed{"
    + "".join(random.Random(1).choice(string.printable) for _ in range(100_000))
    + "}",
    "200-deep nested braces": r"\boxed{" + "{" * 200 + "3" + "}" * 200 + "}",
}


def math_pairs(count: int) -> tuple[list[str], list[str], str]:
    """(responses, golds, description) for the math throughput run."""
    path = DATA / "math500.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = (rows * (count // len(rows) + 1))[:count]
        return [r["solution"] for r in rows], [r["answer"] for r in rows], "MATH500 gold solution vs answer"
    rng = random.Random(0)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(count)]
    return (
        [rf"so the answer is \boxed{{\frac{{{a}}}{{{b}}}}}" for a, b in pairs],
        [str(a / b) for a, b in pairs],
        "generated fractions vs decimals",
    )


def measure_math(count: int) -> dict:
    responses, golds, source = math_pairs(count)
    rewards.math_rewards(responses[:20], golds[:20])  # start and warm up both workers
    started = time.perf_counter()
    scores = rewards.math_rewards(responses, golds)
    elapsed = time.perf_counter() - started
    single = []
    rng = random.Random(1)
    for _ in range(50):  # one check per call, on inputs not seen before (math-verify caches parses)
        a, b = rng.randint(100, 10**6), rng.randint(100, 10**6)
        single_started = time.perf_counter()
        rewards.math_reward(rf"\boxed{{\frac{{{a}}}{{{b}}}}}", f"{a}/{b}")
        single.append(time.perf_counter() - single_started)
    return {
        "checks": count,
        "source": source,
        "seconds": elapsed,
        "checks_per_second": count / elapsed,
        "agreement": sum(scores) / count,
        "single_call_median_ms": 1000 * statistics.median(single),
    }


def measure_pathological(repeats: int, timeout: float) -> dict:
    results = {}
    for name, response in PATHOLOGICAL.items():
        latencies = []
        for _ in range(repeats):
            started = time.perf_counter()
            rewards.math_reward(response, "3", timeout=timeout)
            latencies.append(time.perf_counter() - started)
        results[name] = {"median_s": statistics.median(latencies), "worst_s": max(latencies)}
    return {"timeout_s": timeout, "repeats": repeats, "inputs": results}


def measure_code(runs: int, sandbox: str) -> dict:
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [{"input": "2 3\n", "output": "5\n"}]
    check_program = "def add(a, b):\n    return a + b\n"
    check = [{"check": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}]
    rewards.code_reward(program, tests, sandbox=sandbox)  # warm-up (probes, first-time logging)
    result = {}
    for label, (source, kind_tests) in {"stdio": (program, tests), "check": (check_program, check)}.items():
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(rewards.code_reward, source, kind_tests, sandbox=sandbox) for _ in range(runs)]
            scores = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
        assert all(score == 1.0 for score in scores), f"{sandbox}/{label}: a correct program failed"
        result[label] = {"runs": runs, "seconds": elapsed, "runs_per_second": runs / elapsed}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--math-checks", type=int, default=500)
    parser.add_argument("--code-runs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each pathological input")
    parser.add_argument(
        "--timeout",
        type=float,
        default=rewards.DEFAULT_MATH_TIMEOUT,
        help="per-check limit for the pathological inputs (seconds)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "verifier_throughput.json")
    args = parser.parse_args()

    modes = ["bwrap", "rlimit"] if sandbox._bwrap_usable() else ["rlimit"]
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "math": measure_math(args.math_checks),
        "pathological_math": measure_pathological(args.repeats, args.timeout),
        "code": {mode: measure_code(args.code_runs, mode) for mode in modes},
    }

    math = report["math"]
    lines = [
        "| verifier | measure | value |",
        "|---|---|---|",
        f"| math (pool of 2) | checks/s, {math['source']} | {math['checks_per_second']:.0f} |",
        f"| math (pool of 2) | one check per call, median latency (ms) | {math['single_call_median_ms']:.1f} |",
    ]
    for mode, kinds in report["code"].items():
        for kind, numbers in kinds.items():
            lines.append(f"| code ({mode}, 2 in flight) | {kind} runs/s | {numbers['runs_per_second']:.1f} |")
    for name, numbers in report["pathological_math"]["inputs"].items():
        lines.append(
            f"| math, pathological: {name} | median / worst latency (s), limit "
            f"{args.timeout:g} s | {numbers['median_s']:.2f} / {numbers['worst_s']:.2f} |"
        )
    print("\n".join(lines))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
