"""Experiment 2 of the paper: does TreeRL train better than ChainRL for the same generation cost?

    python -m eval.compare_rl [--seeds 0,1,2] [--budget 200000] [--methods all] [--quick] [train.py flags]

Every method starts from the same warm-started policy (the CPU default's, made and cached by
train.py) and trains until it has generated `--budget` tokens: generation is what a tree search
saves, so methods are compared at equal generated tokens, not equal steps. Methods:

  treerl             EPTree (M=4, N=2, L=1, T=2; entropy forks) + process rewards (GA + LA, 1/sqrt)
  chainrl-grpo       12 independent chains per prompt (about a TreeRL step's tokens), GRPO advantages
  chainrl-drgrpo     the same with Dr. GRPO advantages (no division by the group's std)
  treerl-random      ablation: fork at random tokens instead of the most uncertain ones
  treerl-ga-only     ablation: global advantage V(s) - V(root) only (Eq. 2)
  treerl-la-only     ablation: local advantage V(s) - V(parent) only (Eq. 3)
  treerl-no-sqrt     ablation: no 1/sqrt(|L(s)|) re-weighting

Each run is an ordinary train.py run (its folder holds metrics.jsonl, metrics.png, summary.json);
held-out accuracy is avg@k at temperature 1 on the same held-out problems for every seed.
Writes results/compare_rl.json (one row per evaluation point: method, seed, generated_tokens,
accuracy) and a PNG of accuracy against generated tokens (mean over seeds, band = ± sd), and
prints a Markdown table of the final accuracies. Unknown flags go to every train.py run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import train
from eval.common import machine, markdown_table, mean_std, parse_seeds, warm_started_policy, write_json

METHODS = {
    "treerl": [],
    "chainrl-grpo": ["--algo", "chainrl", "--M", "12", "--advantage", "grpo"],
    "chainrl-drgrpo": ["--algo", "chainrl", "--M", "12", "--advantage", "drgrpo"],
    "treerl-random": ["--fork_score", "random"],
    "treerl-ga-only": ["--use_local", "false"],
    "treerl-la-only": ["--use_global", "false"],
    "treerl-no-sqrt": ["--reweight", "none"],
}


def train_one(method: str, seed: int, args, warm_dir: Path, train_args: list[str]) -> list[dict]:
    """One train.py run from the warm start; returns its evaluation points. A finished run with
    the same budget and learning rate is read back instead of trained again (re-running the script
    after an interruption continues where it stopped)."""
    run_name = f"{method}-seed{seed}"
    run_dir = Path(args.runs_dir) / run_name
    summary = run_dir / "summary.json"
    done = summary.exists() and all(
        json.loads(summary.read_text())["config"][key] == value
        for key, value in (("max_generated_tokens", args.budget), ("lr", args.lr)))
    if not done:
            train.main([*train_args, *METHODS[method], "--model", str(warm_dir), "--seed", str(seed),
                    "--output_dir", args.runs_dir, "--run_name", run_name, "--lr", str(args.lr),
                    "--steps", "100000", "--max_generated_tokens", str(args.budget),
                    "--eval_every", str(args.eval_every), "--save_every", "0"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["step"] > 0]
    seconds = sum(m["time_rollout"] + m["time_verify"] + m["time_update"] + m["time_sync"] for m in steps)
    return [{"method": method, "seed": seed, "step": m["step"],
             "generated_tokens": m.get("generated_tokens_total", 0), "accuracy": m["eval_sampled"],
             "greedy_accuracy": m["eval_greedy"], "seconds_per_step": seconds / max(len(steps), 1)}
            for m in metrics if "eval_sampled" in m]


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: start and final accuracy (mean, sd over seeds), gain, steps, seconds per step."""
    table = []
    for method in methods:
        runs = {}
        for r in rows:
            if r["method"] == method:
                runs.setdefault(r["seed"], []).append(r)
        first = [points[0]["accuracy"] for points in runs.values()]
        last = [points[-1]["accuracy"] for points in runs.values()]
        (start, _), (final, final_sd) = mean_std(first), mean_std(last)
        gains = mean_std([b - a for a, b in zip(first, last)])
        table.append({"method": method, "seeds": len(runs), "accuracy_start": start,
                      "accuracy_final": final, "accuracy_final_std": final_sd,
                      "gain": gains[0], "gain_std": gains[1],
                      "steps": mean_std([points[-1]["step"] for points in runs.values()])[0],
                      "generated_tokens": mean_std([points[-1]["generated_tokens"] for points in runs.values()])[0],
                      "seconds_per_step": mean_std([points[-1]["seconds_per_step"] for points in runs.values()])[0]})
    return table


def plot(rows: list[dict], methods: list[str], budget: int, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0, budget, 21)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in methods:
        curves = []
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            points = [r for r in rows if r["method"] == method and r["seed"] == seed]
            curves.append(np.interp(grid, [p["generated_tokens"] for p in points], [p["accuracy"] for p in points]))
        curves = np.array(curves)
        mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))
        style = "-" if method in ("treerl", "chainrl-grpo", "chainrl-drgrpo") else "--"
        ax.plot(grid, mean, style, label=method)
        ax.fill_between(grid, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("generated tokens (RL)")
    ax.set_ylabel("held-out accuracy (avg@k, temperature 1)")
    ax.set_title("TreeRL vs ChainRL at equal generated tokens (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to every train.py run.")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    parser.add_argument("--budget", type=int, default=200_000, help="generated tokens per run")
    parser.add_argument("--methods", default="all", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--lr", type=float, default=1e-4, help="RL learning rate for every method")
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every this many steps")
    parser.add_argument("--out", default="results", help="folder for compare_rl.json/.png")
    parser.add_argument("--runs_dir", default="runs/experiments", help="folder of the warm start and the runs")
    parser.add_argument("--quick", action="store_true",
                        help="treerl and chainrl-grpo, one seed, 1/10 of the budget (for tests)")
    args, train_args = parser.parse_known_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.methods, args.seeds, args.budget = ["treerl", "chainrl-grpo"], args.seeds[:1], args.budget // 10
    if args.budget < 1:
        parser.error(f"--budget must be >= 1, got {args.budget}")
    return args, train_args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = parse_args(argv)
    started = time.perf_counter()
    warm_dir = warm_started_policy(args.runs_dir, train_args)
    rows, out = [], Path(args.out)
    for seed in args.seeds:
        for method in args.methods:
            rows += train_one(method, seed, args, warm_dir, train_args)
            # Written after every run, so an interrupted comparison still leaves its results.
            methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
            table = summarise(rows, methods)
            result = {"command": "python -m eval.compare_rl " + " ".join(argv), "machine": machine(),
                      "budget_tokens": args.budget, "lr": args.lr, "seeds": sorted({r["seed"] for r in rows}),
                      "summary": table, "rows": rows, "wall_seconds": time.perf_counter() - started}
            write_json(out / "compare_rl.json", result)
            plot(rows, methods, args.budget, out / "compare_rl.png")
    print(markdown_table(
        ["method", "seeds", "start", "final (mean ± sd)", "gain (mean ± sd)", "steps", "s/step"],
        [[t["method"], t["seeds"], f"{t['accuracy_start']:.3f}",
          f"{t['accuracy_final']:.3f} ± {t['accuracy_final_std']:.3f}", f"{t['gain']:+.3f} ± {t['gain_std']:.3f}",
          f"{t['steps']:.0f}", f"{t['seconds_per_step']:.2f}"] for t in table]))
    print(f"budget {args.budget} generated tokens per run, {result['wall_seconds']:.0f} s; "
          f"wrote {out / 'compare_rl.json'} and .png")
    return result


if __name__ == "__main__":
    main()
