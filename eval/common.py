"""Pieces the experiment scripts share: the warm-started CPU default policy and small statistics."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

import policy
import tasks


@dataclass
class _Seed:
    seed: int = 0


def warm_started_policy(output_dir: str, train_args: list[str]) -> Path:
    """The folder of the CPU default's warm-started policy, with the policy and task flags of
    train.py found in `train_args` (e.g. a smaller model; other flags are ignored here). It is made
    once in `output_dir/warm-start/warmstart` (policy.warm_started_policy caches it there, as
    `train.py --output_dir output_dir --run_name warm-start` would) and reused while the settings
    match."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((policy.PolicyConfig, tasks.TaskConfig, _Seed))
    policy_cfg, task_cfg, seed, _ = parser.parse_args_into_dataclasses(train_args, return_remaining_strings=True)
    warm_dir = Path(output_dir) / "warm-start" / "warmstart"
    train_size = tasks.arith_train_size(policy_cfg.warmup_steps * policy_cfg.warmup_batch_size, 0)
    policy.warm_started_policy(policy_cfg, task_cfg, seed.seed, warm_dir, policy.pick_device(policy_cfg), train_size)
    return warm_dir


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


def machine() -> str:
    """One line naming the machine a measurement was taken on."""
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {platform.system()}"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
