"""Which held-out problems did RL break, and which did it fix? Greedy answers of two policies.

    python -m eval.greedy_flips --before runs/long/warm-start/warmstart \
        --after runs/long/treerl-seed0/checkpoints/step-000035 --config configs/cpu_long.yaml [--out DIR]

Greedy accuracy can move by a point or two while dozens of problems change sides: this script
decodes every held-out problem of the task of the flags (train.py's flags; --config reads a preset)
greedily with both policies and counts the problems that went right -> wrong and wrong -> right.
On the arithmetic task it also finds, in each newly broken answer, the first worked step whose
result is wrong and tallies how far off it is in magnitude (|wrong| - |right|): a policy that
drifts in one direction shows up as one dominant value. Prints the broken answers and a table;
writes <out>/greedy_flips.json with --out.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import torch

import policy
import tasks
import train
from eval.common import markdown_table, write_json
from hf_backend import HFBackend

STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")


def greedy_answers(path: str, config, device) -> tuple[tasks.Task, list[str], list[float]]:
    """The held-out problems, the policy's greedy responses to them, and their verdicts."""
    model, tokenizer = policy.load_policy(path, config.policy, device)
    model.eval()
    task = tasks.build_task(config.task, tokenizer)
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size)
    texts, verdicts = tasks.held_out_answers(backend, tokenizer, task, 1, config.rollout.max_new_tokens, 0.0)
    return task, texts, verdicts


def first_slip(response: str) -> int | None:
    """|wrong| - |right| at the first worked step "a+b=r" whose result is wrong (None: no such step)."""
    for line in response.splitlines():
        match = STEP.match(line.strip())
        if match:
            a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
            right = a + b if op == "+" else a - b
            if result != right:
                return abs(result) - abs(right)
    return None


def compare(before: list[float], after: list[float], after_texts: list[str]) -> dict:
    """Problems (by index) that went right -> wrong and wrong -> right between two verdict lists,
    and the first-slip magnitudes of the broken ones (None: no wrong worked step was found)."""
    broken = [i for i, (x, y) in enumerate(zip(before, after)) if x and not y]
    fixed = [i for i, (x, y) in enumerate(zip(before, after)) if y and not x]
    slips = Counter(first_slip(after_texts[i]) for i in broken)
    return {
        "problems": len(before),
        "accuracy_before": sum(before) / len(before),
        "accuracy_after": sum(after) / len(after),
        "right_to_wrong": len(broken),
        "wrong_to_right": len(fixed),
        "broken": broken,
        "fixed": fixed,
        "first_slip_magnitude": {
            str(k): v for k, v in sorted(slips.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py's config."
    )
    parser.add_argument("--before", required=True, help="policy folder (save_pretrained), e.g. the warm start")
    parser.add_argument("--after", required=True, help="policy folder, e.g. a checkpoint of an RL run")
    parser.add_argument("--out", default="", help="folder for greedy_flips.json (none: print only)")
    args, train_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for path in (args.before, args.after):
        if not (Path(path) / "config.json").exists():
            parser.error(f"{path}: not a saved policy (no config.json)")
    config = train.parse_config(train_args)
    device = policy.pick_device(config.policy)
    torch.manual_seed(config.run.seed)
    task, before_texts, before = greedy_answers(args.before, config, device)
    _, after_texts, after = greedy_answers(args.after, config, device)
    result = {"before": args.before, "after": args.after, **compare(before, after, after_texts)}
    for i in result["broken"]:
        print(f"{task.eval[i].prompt.strip()!r}: {before_texts[i]!r} -> {after_texts[i]!r}")
    print(
        markdown_table(
            [
                "greedy accuracy before",
                "after",
                "right -> wrong",
                "wrong -> right",
                "first wrong step of the broken, |wrong| - |right|: count",
            ],
            [
                [
                    f"{result['accuracy_before']:.3f}",
                    f"{result['accuracy_after']:.3f}",
                    result["right_to_wrong"],
                    result["wrong_to_right"],
                    ", ".join(f"{k}: {v}" for k, v in result["first_slip_magnitude"].items()),
                ]
            ],
        )
    )
    if args.out:
        write_json(Path(args.out) / "greedy_flips.json", result)
    return result


if __name__ == "__main__":
    main()
