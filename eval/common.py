"""Pieces the experiment scripts share: the warm-started CPU default policy and small statistics."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

import train


def warm_started_policy(output_dir: str, train_args: list[str]) -> Path:
    """The folder of the CPU default's warm-started policy (plus any train.py flags in
    `train_args`, e.g. a smaller model), made by `train.py --steps 0` in `output_dir/warm-start`.
    train.py caches it there, so later calls with the same settings only re-evaluate it."""
    train.main(["--output_dir", output_dir, "--run_name", "warm-start", "--steps", "0",
                "--eval_every", "0", "--save_every", "0", *train_args])
    return Path(output_dir) / "warm-start" / "warmstart"


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
