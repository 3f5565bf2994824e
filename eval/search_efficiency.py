"""Experiment 1 of the paper (its Figure 1): does EPTree find more correct answers than independent
sampling for the same number of generated tokens?

    python -m eval.search_efficiency [--seeds 0,1,2] [--prompts 100] [--quick] [train.py flags]

On the CPU default task, from the warm-started policy (made and cached by train.py), every method
samples for the same held-out prompts with the same seeds:

  * chains:          M independent responses per prompt (EPTree with L = 0), M in CHAIN_SIZES;
  * eptree-entropy:  EPTree with M trees in TREE_SIZES, N = 2 forks per tree, L = 1 round, T = 2
                     continuations per fork, forking at the highest-entropy tokens (the paper);
  * eptree-nll:      the same, forking at the least likely sampled tokens (the official release);
  * eptree-random:   the same, forking at random eligible tokens (the ablation).

The x-axis is what a search costs: generated tokens per prompt, counted exactly (a fork pays only
for the continuation it samples; the prefix it re-uses is free). Two y-axes, as in the paper:
pass rate (the fraction of leaves that are correct: how good the training signal's samples are) and
pass@budget (whether any leaf is correct: how often the search finds an answer at all). Mean and
standard deviation are over seeds. Writes results/search_efficiency.json and .png and prints a
Markdown table. Unknown flags go to train.py (e.g. --hidden_size 32 for a quick look).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import policy
import tasks
import train
import tree
import treerl
from eval.common import machine, markdown_table, mean_std, parse_seeds, warm_started_policy, write_json
from hf_backend import HFBackend
from treerl import RolloutConfig

CHAIN_SIZES = (4, 8, 16, 32)
TREE_SIZES = (1, 2, 4, 8)
FORK_SCORES = ("entropy", "nll", "random")


def methods(chain_sizes, tree_sizes) -> list[tuple[str, RolloutConfig]]:
    """(method name, rollout settings) for every point of the figure."""
    points = [("chains", RolloutConfig(algo="chainrl", M=m)) for m in chain_sizes]
    for score in FORK_SCORES:
        points += [(f"eptree-{score}", RolloutConfig(algo="treerl", M=m, N=2, L=1, T=2, fork_score=score))
                   for m in tree_sizes]
    return points


def search(backend, task, tokenizer, prompts, golds, cfg: RolloutConfig, seed: int) -> dict[str, float]:
    """Grow one forest per prompt and score it: mean pass rate, pass@budget, tokens per prompt."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers)
    torch.manual_seed(seed)
    forests = treerl.rollout(backend, prompts, golds, task.score, decode, cfg, seed=seed,
                             answer_start=answer_start).forests
    verdicts = [[leaf.reward for leaf in tree.leaves(root)] for root in forests]
    return {
        "pass_rate": sum(sum(v) / len(v) for v in verdicts) / len(verdicts),
        "pass_at_budget": sum(max(v) for v in verdicts) / len(verdicts),
        "tokens": sum(tree.generated_tokens(root) for root in forests) / len(forests),
        "leaves": sum(len(v) for v in verdicts) / len(verdicts),
    }


def run(args, train_args: list[str]) -> dict:
    config = train.parse_config(train_args)
    model_dir = args.model or str(warm_started_policy(args.runs_dir, train_args))
    device = policy.pick_device(config.policy)
    model, tokenizer = policy.load_policy(model_dir, config.policy, device)
    task = tasks.build_task(config.task, tokenizer)
    held_out = task.eval[: args.prompts]
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in held_out]
    golds = [e.gold for e in held_out]
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size)

    points = methods(args.chain_sizes, args.tree_sizes)
    seeds = args.seeds
    rows = []
    progress = policy.progress_bar(None, total=len(points) * len(seeds), desc="search efficiency")
    for name, cfg in points:
        cfg.max_new_tokens = config.rollout.max_new_tokens
        per_seed = []
        for seed in seeds:
            per_seed.append(search(backend, task, tokenizer, prompts, golds, cfg, seed))
            progress.update()
        (rate, rate_sd), (hit, hit_sd) = (mean_std([s[k] for s in per_seed]) for k in ("pass_rate", "pass_at_budget"))
        rows.append({
            "method": name, "M": cfg.M, "N": cfg.N if name != "chains" else 0, "L": cfg.rounds,
            "T": cfg.T if name != "chains" else 0, "leaves": per_seed[0]["leaves"],
            "budget_tokens": sum(s["tokens"] for s in per_seed) / len(per_seed),
            "pass_rate": rate, "pass_rate_std": rate_sd, "pass_at_budget": hit, "pass_at_budget_std": hit_sd,
            "seeds": [{"seed": seed, **s} for seed, s in zip(seeds, per_seed)],
        })
    progress.close()
    return {"model": model_dir, "prompts": len(prompts), "seeds": seeds, "rows": rows}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "pass_rate", "pass rate (fraction of correct leaves)"),
                           (axes[1], "pass_at_budget", "pass@budget (any leaf correct)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [r for r in rows if r["method"] == method]
            ax.errorbar([r["budget_tokens"] for r in points], [r[key] for r in points],
                        yerr=[r[f"{key}_std"] for r in points], marker="o", ms=4, capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens per prompt")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Search efficiency at equal generated tokens (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to train.py (model size, task, max_new_tokens, ...).")
    parser.add_argument("--model", default="", help="warm-started policy folder (default: made with train.py)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts to search on")
    parser.add_argument("--out", default="results", help="folder for search_efficiency.json/.png")
    parser.add_argument("--runs_dir", default="runs/experiments", help="where the warm start is cached")
    parser.add_argument("--quick", action="store_true", help="two sizes per method, one seed (for tests)")
    args, train_args = parser.parse_known_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    args.chain_sizes, args.tree_sizes = (CHAIN_SIZES[:2], TREE_SIZES[:2]) if args.quick else (CHAIN_SIZES, TREE_SIZES)
    if args.quick:
        args.seeds = args.seeds[:1]
    return args, train_args


def main(argv: list[str] | None = None) -> dict:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    result = run(args, train_args)
    result.update(machine=machine(), wall_seconds=time.perf_counter() - started,
                  command="python -m eval.search_efficiency " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    write_json(out / "search_efficiency.json", result)
    plot(result["rows"], out / "search_efficiency.png")
    table = [[r["method"], f"{r['M']},{r['N']},{r['L']},{r['T']}", r["leaves"], f"{r['budget_tokens']:.0f}",
              f"{r['pass_rate']:.3f} ± {r['pass_rate_std']:.3f}",
              f"{r['pass_at_budget']:.3f} ± {r['pass_at_budget_std']:.3f}"] for r in result["rows"]]
    print(markdown_table(["method", "M,N,L,T", "leaves", "tokens/prompt", "pass rate", "pass@budget"], table))
    print(f"{result['prompts']} held-out prompts, seeds {result['seeds']}, {result['wall_seconds']:.0f} s; "
          f"wrote {out / 'search_efficiency.json'} and .png")
    return result


if __name__ == "__main__":
    main()
