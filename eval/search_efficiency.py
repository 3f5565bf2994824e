"""Experiment 1 of the paper (its Figure 1): does EPTree find more correct answers than independent
sampling for the same number of generated tokens?

    python -m eval.search_efficiency --config configs/cpu_long.yaml --out results/long \\
        [--seeds 0,1,2,3,4] [--prompts 200] [--chain_lengths 3,4:5,6:7,8] [--quick] [train.py flags]

From a warm-started policy (made and cached per task by train.py's warm start), every method
samples for the same held-out prompts with the same seeds:

  * chains:          M independent responses per prompt (EPTree with L = 0), M in CHAIN_SIZES;
  * eptree-nll:      EPTree with M trees in TREE_SIZES, N = 2 forks per tree, L = 1 round, T = 2
                     continuations per fork, forking at the least likely sampled tokens
                     (-log pi(y_t), Algorithm 1's H(y_t): the paper's score and the default);
  * eptree-entropy:  the same, forking at the highest full-distribution entropy (an extension);
  * eptree-random:   the same, forking at random eligible tokens (the ablation).

The x-axis is what a search costs: generated tokens per prompt, counted exactly (a fork pays only
for the continuation it samples; the prefix it re-uses is free). Two measures per forest:

  * PassRate, as the paper names it: whether at least one leaf is correct (how often the search
    finds an answer at all);
  * correct-leaf fraction: the fraction of leaves that are correct (how much positive signal the
    forest gives training).

A tree point and a chain point never cost exactly the same, so each tree point is compared with the
chains' PassRate at its own token count, interpolated linearly in log-tokens between the two chain
sizes around it (per seed; the ratio's mean and sd are over seeds).

`--chain_lengths 3,4:5,6:7,8` adds the teaching figure: the same comparison (chains against
eptree-nll) on tasks with short, medium and long worked solutions, each with its own warm start
(cached under --runs_dir/operands-A-B, or the main one for the main task) and max_new_tokens of 16
per operand. The tree's advantage at
equal tokens grows with the chain length: the longer the chain, the more places it can slip, and a
fork re-samples one slipped step instead of the whole chain.

Every (task, method, size, seed) point is appended to `<out>/search_efficiency_points.jsonl` as soon
as it is measured, and a re-run skips the points already there: an interrupted experiment continues
where it stopped (delete the file to measure afresh). Writes `<out>/search_efficiency.json` and .png
(and search_efficiency_chain_length.png) and prints Markdown tables. Unknown flags go to train.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

import policy
import tasks
import train
import tree
import treerl
from eval.common import machine, markdown_table, mean_std, parse_seeds, warm_start_pool, warm_started_policy, write_json
from hf_backend import HFBackend
from treerl import RolloutConfig

CHAIN_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
TREE_SIZES = (1, 2, 3, 4, 6)
FORK_SCORES = ("nll", "entropy", "random")
# The chain-length figure: fewer sizes, the paper's score only.
LENGTH_CHAIN_SIZES = (1, 2, 4, 8, 16)
LENGTH_TREE_SIZES = (1, 2, 4)
TOKENS_PER_OPERAND = 16


def methods(chain_sizes, tree_sizes, fork_scores=FORK_SCORES) -> list[tuple[str, RolloutConfig]]:
    """(method name, rollout settings) for every point of the figure."""
    points = [("chains", RolloutConfig(algo="chainrl", M=m)) for m in chain_sizes]
    for score in fork_scores:
        points += [
            (f"eptree-{score}", RolloutConfig(algo="treerl", M=m, N=2, L=1, T=2, fork_score=score)) for m in tree_sizes
        ]
    return points


def search(backend, task, tokenizer, prompts, golds, cfg: RolloutConfig, seed: int) -> dict[str, float]:
    """Grow one forest per prompt and score it: PassRate, correct-leaf fraction, tokens per prompt."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers)
    torch.manual_seed(seed)
    forests = treerl.rollout(
        backend, prompts, golds, task.score, decode, cfg, seed=seed, answer_start=answer_start
    ).forests
    verdicts = [[leaf.reward for leaf in tree.leaves(root)] for root in forests]
    return {
        "pass_rate": sum(max(v) for v in verdicts) / len(verdicts),
        "correct_fraction": sum(sum(v) / len(v) for v in verdicts) / len(verdicts),
        "tokens": sum(tree.generated_tokens(root) for root in forests) / len(forests),
        "leaves": sum(len(v) for v in verdicts) / len(verdicts),
    }


def chains_at(tokens: float, chain_points: list[dict], key: str = "pass_rate") -> float | None:
    """The chains' `key` at `tokens` generated tokens, linear in log-tokens between the two chain
    sizes around it; None outside the chains' range (no extrapolation)."""
    points = sorted(chain_points, key=lambda p: p["tokens"])
    for low, high in zip(points, points[1:]):
        if low["tokens"] <= tokens <= high["tokens"]:
            w = (math.log(tokens) - math.log(low["tokens"])) / (math.log(high["tokens"]) - math.log(low["tokens"]))
            return low[key] + w * (high[key] - low[key])
    return None


def measure(config: train.Config, args, points, runs_dir: Path, cache: Path) -> list[dict]:
    """Every point × seed on the task of `config` (from its cached warm start); one row per point,
    with the per-seed results and the comparison with the chains at equal tokens."""
    model_dir = (
        Path(args.model) if args.model else warm_started_policy(runs_dir, config.policy, config.task, config.run.seed)
    )
    recipe = model_dir / "recipe.json"
    model_id = hashlib.sha1((recipe.read_text() if recipe.exists() else str(model_dir)).encode()).hexdigest()[:12]
    task_id = (
        f"{config.task.task}:{config.task.arith_operands}:{config.rollout.max_new_tokens}:{args.prompts}:{model_id}"
    )
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["result"]

    model = tokenizer = None
    per_point = []
    progress = policy.progress_bar(
        None, total=len(points) * len(args.seeds), desc=f"search efficiency ({config.task.arith_operands} operands)"
    )
    for name, cfg in points:
        cfg.max_new_tokens = config.rollout.max_new_tokens
        per_seed = []
        for seed in args.seeds:
            key = f"{task_id}|{name}|{cfg.M}|{seed}"
            if key not in done:
                if model is None:  # loaded only when something is left to measure
                    device = policy.pick_device(config.policy)
                    model, tokenizer = policy.load_policy(str(model_dir), config.policy, device)
                    task = tasks.build_task(config.task, tokenizer, warm_start_pool(config.policy))
                    held_out = task.eval[: args.prompts]
                    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in held_out]
                    golds = [e.gold for e in held_out]
                    backend = HFBackend(
                        model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size
                    )
                done[key] = search(backend, task, tokenizer, prompts, golds, cfg, seed)
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a") as f:
                    f.write(json.dumps({"key": key, "result": done[key]}) + "\n")
            per_seed.append({"seed": seed, **done[key]})
            progress.update()
        per_point.append((name, cfg, per_seed))
    progress.close()

    chains = {
        seed: [s for name, _, per_seed in per_point if name == "chains" for s in per_seed if s["seed"] == seed]
        for seed in args.seeds
    }
    rows = []
    for name, cfg, per_seed in per_point:
        row = {
            "method": name,
            "operands": config.task.arith_operands,
            "M": cfg.M,
            "N": cfg.N if name != "chains" else 0,
            "L": cfg.rounds if name != "chains" else 0,
            "T": cfg.T if name != "chains" else 0,
            "leaves": per_seed[0]["leaves"],
            "budget_tokens": sum(s["tokens"] for s in per_seed) / len(per_seed),
            "seeds": per_seed,
        }
        for key in ("pass_rate", "correct_fraction"):
            row[key], row[f"{key}_std"] = mean_std([s[key] for s in per_seed])
        if name != "chains":
            at = [chains_at(s["tokens"], chains[s["seed"]]) for s in per_seed]
            if all(a is not None for a in at):
                row["chains_pass_rate_at_equal_tokens"], row["chains_pass_rate_at_equal_tokens_std"] = mean_std(at)
                row["pass_rate_ratio"], row["pass_rate_ratio_std"] = mean_std(
                    [s["pass_rate"] / a for s, a in zip(per_seed, at) if a > 0]
                )
        rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    """The paper's Figure 1 form: PassRate against generated tokens per prompt (log scale), one
    curve per method, band = ± sd over seeds; the correct-leaf fraction beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "pass_rate", "PassRate (at least one correct leaf)"),
        (axes[1], "correct_fraction", "fraction of correct leaves"),
    ):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget_tokens"])
            x = [r["budget_tokens"] for r in points]
            mean = [r[key] for r in points]
            sd = [r[f"{key}_std"] for r in points]
            ax.plot(x, mean, marker="o", ms=4, label=method, ls="-" if method in ("chains", "eptree-nll") else "--")
            ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt (log scale)")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    operands = rows[0]["operands"]
    fig.suptitle(f"Search efficiency at equal generated tokens, {operands} operands (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_chain_length(by_length: dict[str, list[dict]], out: Path) -> None:
    """The tree's PassRate over the chains' at equal tokens, against the task's chain length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(by_length)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in LENGTH_TREE_SIZES:
        points = [
            next((r for r in by_length[length] if r["method"] == "eptree-nll" and r["M"] == m), None)
            for length in lengths
        ]
        kept = [(i, r) for i, r in enumerate(points) if r and "pass_rate_ratio" in r]
        if kept:
            ax.errorbar(
                [i for i, _ in kept],
                [r["pass_rate_ratio"] for _, r in kept],
                yerr=[r["pass_rate_ratio_std"] for _, r in kept],
                marker="o",
                capsize=3,
                label=f"EPTree, {m} tree{'s' if m > 1 else ''} ({5 * m} leaves)",
            )
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xticks(range(len(lengths)), [f"{length.replace(',', '-')} operands" for length in lengths])
    ax.set_ylabel("PassRate of EPTree / chains at equal tokens")
    ax.set_title("Why trees help: the advantage grows with the chain length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    def cell(row, key):
        return f"{row[key]:.3f} ± {row[f'{key}_std']:.3f}" if key in row else "—"

    print(
        markdown_table(
            [
                "operands",
                "method",
                "M,N,L,T",
                "leaves",
                "tokens/prompt",
                "PassRate",
                "chains' PassRate at equal tokens",
                "ratio",
                "correct-leaf fraction",
            ],
            [
                [
                    r["operands"],
                    r["method"],
                    f"{r['M']},{r['N']},{r['L']},{r['T']}",
                    r["leaves"],
                    f"{r['budget_tokens']:.0f}",
                    cell(r, "pass_rate"),
                    cell(r, "chains_pass_rate_at_equal_tokens"),
                    cell(r, "pass_rate_ratio"),
                    cell(r, "correct_fraction"),
                ]
                for r in rows
            ],
        )
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other flags are passed to train.py (--config, model size, task, ...).",
    )
    parser.add_argument("--model", default="", help="warm-started policy folder (default: made with train.py)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated sampling seeds")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to search on")
    parser.add_argument(
        "--chain_lengths",
        default="",
        help="also compare chains and eptree-nll at these operand ranges, e.g. 3,4:5,6:7,8",
    )
    parser.add_argument("--out", default="results", help="folder for search_efficiency.json/.png and the points")
    parser.add_argument("--runs_dir", default="runs/experiments", help="where the warm starts are cached")
    parser.add_argument("--quick", action="store_true", help="two sizes per method, one seed (for tests)")
    args, train_args = parser.parse_known_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    args.chain_lengths = [c for c in args.chain_lengths.split(":") if c]
    if args.model and args.chain_lengths:
        parser.error("--chain_lengths makes one warm start per task; it cannot be used with --model")
    args.chain_sizes, args.tree_sizes = (CHAIN_SIZES[:3], TREE_SIZES[:2]) if args.quick else (CHAIN_SIZES, TREE_SIZES)
    args.length_chain_sizes, args.length_tree_sizes = (
        (LENGTH_CHAIN_SIZES[:3], LENGTH_TREE_SIZES[:1]) if args.quick else (LENGTH_CHAIN_SIZES, LENGTH_TREE_SIZES)
    )
    if args.quick:
        args.seeds = args.seeds[:1]
    return args, train_args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    cache = out / "search_efficiency_points.jsonl"
    config = train.parse_config(train_args)
    rows = measure(config, args, methods(args.chain_sizes, args.tree_sizes), Path(args.runs_dir), cache)
    result = {
        "prompts": args.prompts,
        "seeds": args.seeds,
        "operands": config.task.arith_operands,
        "max_new_tokens": config.rollout.max_new_tokens,
        "rows": rows,
    }

    by_length = {}
    for operands in args.chain_lengths:
        most = int(operands.split(",")[-1])
        length_config = train.parse_config(
            [*train_args, "--arith_operands", operands, "--max_new_tokens", str(TOKENS_PER_OPERAND * most)]
        )
        same_task = json.dumps(length_config.as_dict()) == json.dumps(config.as_dict())  # the main warm start
        runs_dir = Path(args.runs_dir) / ("" if same_task else f"operands-{operands.replace(',', '-')}")
        by_length[operands] = measure(
            length_config, args, methods(args.length_chain_sizes, args.length_tree_sizes, ("nll",)), runs_dir, cache
        )
    if by_length:
        result["chain_length"] = {"tokens_per_operand": TOKENS_PER_OPERAND, "rows": by_length}

    result.update(
        machine=machine(),
        wall_seconds=time.perf_counter() - started,
        command="python -m eval.search_efficiency " + " ".join(argv),
    )
    write_json(out / "search_efficiency.json", result)
    plot(rows, out / "search_efficiency.png")
    print_table(rows)
    if by_length:
        plot_chain_length(by_length, out / "search_efficiency_chain_length.png")
        print_table([r for length_rows in by_length.values() for r in length_rows])
    print(
        f"{args.prompts} held-out prompts, seeds {args.seeds}, {result['wall_seconds']:.0f} s "
        f"(points measured earlier and read from {cache} cost nothing); wrote {out / 'search_efficiency.json'}"
    )
    return result


if __name__ == "__main__":
    main()
