"""Warm-start recipes of the CPU default: what each costs and where it leaves the policy.

    python -m eval.warm_start_sweep [--recipes 600x64@2e-3,400x32@3e-3] [--seeds 0] [--device cpu]

RL needs a starting policy that is right some of the time and samples slips the rest (greedy
about 90%, avg@4 about 40% on the default task). A recipe is steps x batch @ learning rate of the
supervised stage (policy.warm_start, careless teacher at --warmup_slip_rate); for each one this
trains the tiny model from scratch, times the stage, and scores the held-out set as train.py does
(greedy and avg@4 at temperature 1). Writes results/warm_start_sweep.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import policy
import tasks
from eval.common import machine, markdown_table, parse_seeds, write_json
from hf_backend import HFBackend

DEFAULT_RECIPES = "600x64@2e-3,600x48@2e-3,500x64@2e-3,600x32@2e-3,400x64@3e-3,300x64@4e-3"


def parse_recipe(text: str) -> tuple[int, int, float]:
    shape, lr = text.split("@")
    steps, batch = shape.split("x")
    return int(steps), int(batch), float(lr)


def run(recipe: str, seed: int, device: torch.device) -> dict:
    steps, batch, lr = parse_recipe(recipe)
    cfg = policy.PolicyConfig(warmup_steps=steps, warmup_batch_size=batch, warmup_lr=lr, device=device.type)
    task_cfg = tasks.TaskConfig()
    tokenizer = policy.build_char_tokenizer()
    model = policy.build_tiny_model(cfg, tokenizer, seed).to(device)
    task = tasks.build_task(task_cfg, tokenizer, tasks.arith_train_size(steps * batch, 120 * 16))
    started = time.perf_counter()
    policy.warm_start(model, tokenizer, task, cfg, device, seed)
    seconds = time.perf_counter() - started
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    accuracy = tasks.evaluate(backend, tokenizer, task, samples=4, max_new_tokens=64, temperature=1.0, seed=seed)
    return {
        "recipe": recipe,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "examples": steps * batch,
        "seconds": seconds,
        "greedy": accuracy["greedy"],
        "avg@4": accuracy["sampled"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=DEFAULT_RECIPES)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/warm_start_sweep.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    rows = []
    for recipe in args.recipes.split(","):
        for seed in parse_seeds(parser, args.seeds):
            rows.append(run(recipe, seed, device))
            print(rows[-1], flush=True)
            write_json(
                Path(args.out),
                {
                    "command": "python -m eval.warm_start_sweep " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": machine(),
                    "device": str(device),
                    "rows": rows,
                },
            )
    print(
        markdown_table(
            ["recipe", "seed", "examples", "seconds", "greedy", "avg@4"],
            [
                [
                    r["recipe"],
                    r["seed"],
                    r["examples"],
                    f"{r['seconds']:.0f}",
                    f"{r['greedy']:.1%}",
                    f"{r['avg@4']:.1%}",
                ]
                for r in rows
            ],
        )
    )
    return rows


if __name__ == "__main__":
    main()
