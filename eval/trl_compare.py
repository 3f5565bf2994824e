"""TRL's GRPOTrainer vs TRL + TreeRL (trl_treerl.py) vs this project's trainer, at equal generated tokens.

    python -m eval.trl_compare [--budget 128000] [--grpo_generations 12] [--seed 0] [--lr 3e-5]

Needs `pip install -r requirements-trl.txt`. All three start from the same warm-started policy (the
CPU default's: train.py's tiny model after its 600-step supervised warm start, made and cached by
train.py) and train on the built-in arithmetic task until each has generated `--budget` tokens
(every sampled token counts once; a tree's shared prefixes are generated once):

  trl-grpo     trl.GRPOTrainer: `--grpo_generations` independent completions per prompt, GRPO
               advantages (scaled by the group's std), no tree
  trl-treerl   trl_treerl.TreeRLTrainer: EPTree (M, N, L, T) = (4, 2, 1, 2), 20 leaves per prompt,
               process advantages R(s) on every token
  ours-treerl-flat    train.py's TreeRL (the same search and advantages), one row per leaf
  ours-treerl-packed  the same with --pack_tree (each token of a forest through the model once)
  ours-chainrl        train.py --algo chainrl --M `--grpo_generations` (GRPO advantages, no tree)

Shared settings, as the CPU default: 16 prompts per step, temperature 1, at most 64 new tokens,
AdamW at a constant learning rate `--lr`, no KL, the clip [0.8, 1.28] with token-level averaging
(TRL's `loss_type="dapo"`, our `--aggregation token`), one optimizer step per rollout, gradient
norm clipped at 1. The TRL runs see their prompts in TRL's shuffled order, ours in train.py's.

Held-out accuracy is tasks.evaluate for all three (200 problems, greedy and avg@4 at temperature 1,
same sampling seed). Seconds per step: wall time of the training steps (sampling, scoring, update,
TRL's logging), evaluation excluded; mean and median (the first steps are slower: warm-up). On a
shared machine wall time swings with other jobs, so the runs use one torch thread (`--threads`) and
CPU time per step (time.process_time) is reported too: with one thread it measures the work, not
the contention (several threads spin while they wait for a core, which inflates CPU time too).
TRL's gradient checkpointing (on by default in TRL) is turned off, as in train.py. Writes results/trl_compare.json and prints a Markdown table.
These are measurements on one seed: with 200 held-out problems, differences of a few points of
avg@4 are within noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import packing
import policy
import tasks
import train
import treerl
from eval.common import machine, markdown_table, warm_started_policy, write_json
from hf_backend import HFBackend

ROOT = Path(__file__).resolve().parents[1]


def shared_settings(args, output_dir: str) -> dict:
    """TRL settings that mirror the CPU default's update (see the module docstring)."""
    return dict(
        output_dir=output_dir,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=64,
        gradient_accumulation_steps=4,
        max_steps=10_000,
        seed=args.seed,
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,  # TRL's default is on; train.py's is off (and it halves the speed here)
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )


def held_out_accuracy(model, tokenizer, task, config: train.Config) -> dict[str, float]:
    """train.py's held-out evaluation (tasks.evaluate with the run's settings)."""
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size)
    return tasks.evaluate(
        backend,
        tokenizer,
        task,
        config.task.eval_samples,
        config.rollout.max_new_tokens,
        config.rollout.temperature,
        config.rollout.top_p,
        seed=config.run.seed,
    )


def run_trl(name: str, args, warm_dir: Path, config: train.Config) -> dict:
    """Train one TRL arm from the warm start until the token budget is spent; evaluate it."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import trl_treerl

    run = config.run
    model, tokenizer = policy.load_policy(str(warm_dir), config.policy, torch.device("cpu"))
    task = tasks.build_task(config.task, tokenizer)
    out = str(Path(args.runs_dir) / name)
    prompts = run.prompts_per_step
    if name == "trl-treerl":
        settings = trl_treerl.TreeRLConfig(
            M=4, N=2, L=1, T=2, per_device_train_batch_size=prompts * 20 // 4, **shared_settings(args, out)
        )
        cls = trl_treerl.TreeRLTrainer
    else:
        G = args.grpo_generations
        settings = GRPOConfig(
            num_generations=G,
            per_device_train_batch_size=prompts * G // 4,
            scale_rewards="group",
            **shared_settings(args, out),
        )
        cls = GRPOTrainer

    class Meter(TrainerCallback):
        """Times each step, counts the tokens it sampled, stops at the budget."""

        def __init__(self):
            self.seconds, self.cpu_seconds, self.tokens, self.rewards = [], [], [], []

        def on_step_begin(self, *_, **__):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)
            self.cpu_seconds.append(time.process_time() - self.cpu_started)

        def on_log(self, _args, state, control, logs=None, **__):
            if not logs or "loss" not in logs:
                return
            if "tree/generated_tokens" in logs:
                self.tokens.append(logs["tree/generated_tokens"])
            else:  # every completion is sampled in full: rows x mean length
                self.tokens.append(logs["completions/mean_length"] * settings.generation_batch_size)
            self.rewards.append(logs["reward"])
            if sum(self.tokens) >= args.budget:
                control.should_training_stop = True

    meter = Meter()
    trainer = cls(
        model,
        reward_funcs=trl_treerl.arith_reward_func,
        args=settings,
        train_dataset=trl_treerl.task_dataset(task),
        processing_class=tokenizer,
        callbacks=[meter],
    )
    trainer.train()
    after = held_out_accuracy(model, tokenizer, task, config)
    return {
        "method": name,
        "steps": len(meter.seconds),
        "generated_tokens": int(sum(meter.tokens)),
        "seconds_per_step": sum(meter.seconds) / len(meter.seconds),
        "seconds_per_step_median": statistics.median(meter.seconds),
        "cpu_seconds_per_step": sum(meter.cpu_seconds) / len(meter.cpu_seconds),
        "cpu_seconds_per_1k_tokens": 1000 * sum(meter.cpu_seconds) / max(sum(meter.tokens), 1),
        "train_reward_first": meter.rewards[0],
        "train_reward_last": meter.rewards[-1],
        "accuracy_after": after["sampled"],
        "greedy_accuracy_after": after["greedy"],
    }


OURS = {
    "ours-treerl-flat": ["--pack_tree", "false"],
    "ours-treerl-packed": ["--pack_tree", "true"],
    "ours-chainrl": ["--algo", "chainrl"],
}


def run_ours(name: str, args, warm_dir: Path) -> dict:
    """A train.py run from the same warm start, to the same budget. Its CPU time per step is read
    by wrapping the calls a step makes: treerl.rollout and the update (flat or packed)."""
    flags = OURS[name] + (["--M", str(args.grpo_generations)] if name == "ours-chainrl" else [])
    cpu_seconds = []

    def timed(fn, starts_step):
        def wrapper(*a, **k):
            started = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                if starts_step:
                    cpu_seconds.append(0.0)
                cpu_seconds[-1] += time.process_time() - started

        return wrapper

    rollout, update, update_packed = treerl.rollout, treerl.update, packing.update_packed
    treerl.rollout, treerl.update = timed(rollout, True), timed(update, False)
    packing.update_packed = timed(update_packed, False)
    try:
        train.main(
            [
                "--model",
                str(warm_dir),
                "--output_dir",
                args.runs_dir,
                "--run_name",
                name,
                "--seed",
                str(args.seed),
                "--lr",
                str(args.lr),
                "--steps",
                "10000",
                *flags,
                "--max_generated_tokens",
                str(args.budget),
                "--eval_every",
                "0",
                "--save_every",
                "0",
                "--save_trees",
                "false",
            ]
        )
    finally:
        treerl.rollout, treerl.update, packing.update_packed = rollout, update, update_packed
    run_dir = Path(args.runs_dir) / name
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["step"] > 0]
    seconds = [m["time_rollout"] + m["time_verify"] + m["time_update"] + m["time_sync"] for m in steps]
    return {
        "method": name,
        "steps": len(steps),
        "generated_tokens": summary["generated_tokens"],
        "seconds_per_step": sum(seconds) / len(steps),
        "seconds_per_step_median": statistics.median(seconds),
        "cpu_seconds_per_step": sum(cpu_seconds) / len(cpu_seconds),
        "cpu_seconds_per_1k_tokens": 1000 * sum(cpu_seconds) / summary["generated_tokens"],
        "train_reward_first": steps[0]["reward"],
        "train_reward_last": steps[-1]["reward"],
        "accuracy_after": summary["accuracy_after"],
        "greedy_accuracy_after": summary["greedy_accuracy_after"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", type=int, default=128_000, help="generated tokens per method (about 20 TreeRL steps)"
    )
    parser.add_argument(
        "--grpo_generations",
        type=int,
        default=12,
        help="TRL GRPO: completions per prompt (12 chains cost about one TreeRL step's tokens)",
    )
    parser.add_argument("--lr", type=float, default=3e-5, help="train.py's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="trl-grpo,trl-treerl,ours-chainrl,ours-treerl-flat,ours-treerl-packed")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time per step then measures work, not contention)"
    )
    parser.add_argument("--runs_dir", default="runs/trl_compare")
    parser.add_argument("--out", default=str(ROOT / "results" / "trl_compare.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    warm_dir = warm_started_policy(args.runs_dir, seed=args.seed)
    config = train.parse_config(["--seed", str(args.seed)])
    model, tokenizer = policy.load_policy(str(warm_dir), config.policy, torch.device("cpu"))
    accuracy = held_out_accuracy(model, tokenizer, tasks.build_task(config.task, tokenizer), config)
    before = {"accuracy_before": accuracy["sampled"], "greedy_accuracy_before": accuracy["greedy"]}
    rows = []
    for method in args.methods.split(","):
        rows.append(run_ours(method, args, warm_dir) if method in OURS else run_trl(method, args, warm_dir, config))
        print(json.dumps(rows[-1]), flush=True)

    import trl

    table = markdown_table(
        [
            "method",
            "steps",
            "generated tokens",
            "CPU s / 1k tokens",
            "CPU s / step",
            "wall s / step (mean, median)",
            "train reward first → last",
            f"held-out avg@4 ({before['accuracy_before']:.1%} before)",
            f"greedy ({before['greedy_accuracy_before']:.1%} before)",
        ],
        [
            [
                r["method"],
                r["steps"],
                f"{r['generated_tokens']:,}",
                f"{r['cpu_seconds_per_1k_tokens']:.3f}",
                f"{r['cpu_seconds_per_step']:.2f}",
                f"{r['seconds_per_step']:.2f}, {r['seconds_per_step_median']:.2f}",
                f"{r['train_reward_first']:.2f} → {r['train_reward_last']:.2f}",
                f"{r['accuracy_after']:.1%}",
                f"{r['greedy_accuracy_after']:.1%}",
            ]
            for r in rows
        ],
    )
    print(table)
    per_token = {r["method"]: r["cpu_seconds_per_1k_tokens"] for r in rows}
    ratios = {}  # the targets: ours-chainrl <= 1.0 x trl-grpo; ours TreeRL <= 1.25 x ours-chainrl
    if "ours-chainrl" in per_token and "trl-grpo" in per_token:
        ratios["ours-chainrl / trl-grpo"] = per_token["ours-chainrl"] / per_token["trl-grpo"]
    for name in ("ours-treerl-flat", "ours-treerl-packed"):
        if name in per_token and "ours-chainrl" in per_token:
            ratios[f"{name} / ours-chainrl"] = per_token[name] / per_token["ours-chainrl"]
    for key, value in ratios.items():
        print(f"CPU time per generated token, {key}: {value:.2f}")
    payload = {
        "machine": machine(),
        "threads": args.threads,
        "trl": trl.__version__,
        "budget": args.budget,
        "seed": args.seed,
        "lr": args.lr,
        "grpo_generations": args.grpo_generations,
        "accuracy_before": before["accuracy_before"],
        "greedy_accuracy_before": before["greedy_accuracy_before"],
        "rows": rows,
        "ratios_cpu_time_per_token": ratios,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(Path(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
