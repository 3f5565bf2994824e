"""Pieces the experiment scripts share: the warm-started CPU default policy and small statistics."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

import policy
import tasks


def warm_started_policy(
    output_dir: str,
    policy_cfg: policy.PolicyConfig | None = None,
    task_cfg: tasks.TaskConfig | None = None,
    seed: int = 0,
) -> Path:
    """The folder of a warm-started tiny policy for these policy and task settings (default: the
    CPU default's). It is made once in `output_dir/warm-start/warmstart` (policy.warm_started_policy
    caches it there, as `train.py --output_dir output_dir --run_name warm-start` would) and reused
    while the settings match. Scripts that read train.py's flags pass `train.parse_config(...)`'s
    parts, so a `--config` preset applies here too."""
    policy_cfg = policy_cfg or policy.PolicyConfig()
    task_cfg = task_cfg or tasks.TaskConfig()
    warm_dir = Path(output_dir) / "warm-start" / "warmstart"
    policy.warm_started_policy(
        policy_cfg, task_cfg, seed, warm_dir, policy.pick_device(policy_cfg), warm_start_pool(policy_cfg)
    )
    return warm_dir


def warm_start_pool(policy_cfg: policy.PolicyConfig) -> int:
    """Problems in the arithmetic training pool of a warm start made here (what it draws)."""
    return tasks.arith_train_size(policy_cfg.warmup_steps * policy_cfg.warmup_batch_size, 0)


def parse_seeds(parser, text: str) -> list[int]:
    """--seeds "0,1,2" as integers; a malformed list is a usage error of `parser`."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {text!r}")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# Student's t at 0.975 (a two-sided 95% interval) by degrees of freedom; past 30, 30's (a little wide).
T95 = dict(
    enumerate(
        [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
        + [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042],
        start=1,
    )
)


def t95(df: float) -> float:
    """t(0.975) at `df` degrees of freedom, rounded down to a whole number (a wider interval)."""
    return T95[min(max(int(df), 1), 30)]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval (the mean alone for a single value)."""
    mean, sd = mean_std(values)
    half = t95(len(values) - 1) * sd / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, mean - half, mean + half


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% Welch t-interval (unequal variances, Welch-Satterthwaite degrees
    of freedom); both lists need two values or more."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, ma - mb, ma - mb
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t95(df) * se
    return ma - mb, ma - mb - half, ma - mb + half


def cpu_model() -> str:
    """The CPU's marketing name where the system tells it (Linux's /proc/cpuinfo), else what Python knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine a measurement was taken on: the CPU, its cores, the kernels torch
    runs on it (AVX2, AVX512, ...; ATEN_CPU_CAPABILITY=avx2 holds a faster CPU to AVX2), torch's
    threads, the system, and the GPU where there is one. Timings compare only on equal lines."""
    line = (
        f"{cpu_model()} ({os.cpu_count()} cores, torch {torch.backends.cpu.get_cpu_capability()} kernels, "
        f"{torch.get_num_threads()} threads), {platform.system()}"
    )
    if torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name()}"
    return line


def commit() -> str:
    """The git commit a measurement ran from, with "+changes" when tracked files other than results
    (which a measurement writes as it goes) differed from it."""
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.strip() + ("+changes" if changed.stdout.strip() else "")


def write_json(path: Path, payload: dict) -> None:
    """A results file: the payload, led by the commit it ran from (unless the payload names one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"commit": commit(), **payload} if "commit" not in payload else payload
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
