"""Does the tree find the wrong step? Per-token advantages scored against the arithmetic task's
own step truth.

    python -m eval.credit --config configs/cpu_long.yaml --out results/long \\
        [--stage warm-start] [--model DIR] [--seeds 0,1,2,3,4] [--prompts 200] [--quick] [train.py flags]

TreeRL's case for process rewards is credit assignment: in a wrong response the step that slipped
should be pushed down, and the right steps before it should not. The arithmetic task knows the
truth of every step (`tasks.arith_step_truth`: each token is in the correct prefix, the first wrong
step, after it, or the answer line; the chat rendering's, `tasks.chat_arith_step_truth`, reads each
line in the plain format), so the advantages each method would train with can be scored exactly.
From one policy (the warm start, or a checkpoint with --model), for the same held-out prompts and
seeds, every source grows its rollout as `treerl.rollout` does and computes its
per-token advantages:

  * treerl-nll       EPTree (M, N, L, T) of the preset, forks at the highest -log pi (the paper);
  * treerl-entropy   forks at the highest entropy of the full distribution (an extension);
  * treerl-random    forks at random eligible tokens (the paper's ablation);
  * treerl-release   the release's fork rule and process rewards (release.py), -1 if truncated;
  * treerl-no-sqrt,  the paper's rewards without the 1/sqrt(|L(s)|) re-weighting, with the global
    -ga-only,        advantage only, and with the local advantage only (the forests of treerl-nll:
    -la-only         same search, same seed);
  * treerl-N4-T1,    other EPTree shapes and fork exclusions (4 forks of one branch, one fork of
    -N1-T4, -L2-N1,  four, two rounds of one fork; no tail guard, a guard of 12 tokens), each at
    -skip0, -skip12  its own cost (tokens per prompt are reported beside every measure);
  * chains-grpo,     independent chains with outcome advantages, as many per prompt as cost the
    chains-rloo      tokens treerl-nll generated (per seed, from its mean response length);
  * chains-oracle,   chains-grpo with each wrong leaf's advantage mass moved onto its first wrong
    chains-placebo   line, or onto a random line of it (`probes.relocate_blame`, --blame);
  * treerl-fork-line, the forests of treerl-nll with each forked segment's reward, or its local part,
    -fork-line-local  moved onto the segment's first line (`probes.on_fork_lines`, --fork_credit).

Four measures on the *trained* leaves (forests whose leaves all agree carry no signal and are
skipped, as in training), each a mean over seeds with a 95% t-interval:

  * auroc         in every wrong leaf with both, the probability that a correct-prefix token has a
                  higher advantage than a first-wrong-step token (ties count half), averaged over
                  leaves: 0.5 is no separation, 1 perfect;
  * localisation  in a wrong leaf with a wrong step, whether its lowest-advantage line (mean over
                  the line's tokens) is the first wrong step; ties are broken at random, so a leaf
                  whose lines all share one advantage (any chain) scores 1 / lines;
  * collateral    the share of correct-prefix tokens of wrong leaves with a negative advantage;
  * fork_on_slip  trees only: the share of forks in a wrong response that re-sample its first wrong
                  step (the forked token in that step's line, or the newline just before it).

And where the downward push on wrong leaves lands (blame_prefix, blame_slip, blame_after): every
token of a wrong leaf with a negative advantage pushes its token down with weight -A * w (w the
loss's aggregation weight, the update's denominator being common to all); the shares of that weight
on the correct prefix (a cut answer line not yet wrong included), on the first wrong line, and on
the lines after it (the answer included).

Each (stage, source, seed) is appended to `<out>/credit_points.jsonl` when measured and skipped on a
re-run. Writes `<out>/credit.json` (every stage measured so far) and `credit.png`; prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import logprobs
import policy
import tasks
import train
import tree
import treerl
from eval.common import (
    commit,
    machine,
    markdown_table,
    mean_std,
    parse_seeds,
    t_interval,
    warm_start_pool,
    warm_started_policy,
    write_json,
)
from hf_backend import HFBackend

RELEASE = dict(
    fork_exclusions="release",
    full_length_branches=True,
    leave_one_out=True,
    reweight="release",
    fill_in_paths=True,
    truncated_penalty=-1.0,
)
SOURCES = {
    "treerl-nll": {},
    "treerl-entropy": {"fork_score": "entropy"},
    "treerl-random": {"fork_score": "random"},
    "treerl-release": RELEASE,
    "treerl-no-sqrt": {"reweight": "none"},
    "treerl-ga-only": {"use_local": False},
    "treerl-la-only": {"use_global": False},
    "treerl-N4-T1": {"N": 4, "T": 1},
    "treerl-N1-T4": {"N": 1, "T": 4},
    "treerl-L2-N1": {"N": 1, "L": 2},
    "treerl-skip0": {"skip_last": 0},
    "treerl-skip12": {"skip_last": 12},
    "chains-grpo": {"algo": "chainrl", "advantage": "grpo"},
    "chains-rloo": {"algo": "chainrl", "advantage": "rloo"},
    "chains-oracle": {"algo": "chainrl", "advantage": "grpo", "blame": "oracle"},
    "chains-placebo": {"algo": "chainrl", "advantage": "grpo", "blame": "placebo"},
    "treerl-fork-line": {"fork_credit": "fork_line"},
    "treerl-fork-line-local": {"fork_credit": "fork_line_local"},
}
METRICS = ("auroc", "localisation", "collateral", "fork_on_slip")
BLAME = ("blame_prefix", "blame_slip", "blame_after")  # shares of the downward push on wrong leaves
PART = {"prefix": "blame_prefix", "answer": "blame_prefix", "first_wrong": "blame_slip", "after": "blame_after"}


# --------------------------------------------------------------------------------------------------
# Scoring one rollout against the step truth
# --------------------------------------------------------------------------------------------------


def leaf_auroc(advantages: list[float], labels: list[str]) -> float | None:
    """P(a prefix token's advantage > a first-wrong token's), ties half; None without both."""
    prefix = [a for a, label in zip(advantages, labels) if label == "prefix"]
    wrong = [a for a, label in zip(advantages, labels) if label == "first_wrong"]
    if not prefix or not wrong:
        return None
    wins = sum((p > w) + 0.5 * (p == w) for p in prefix for w in wrong)
    return wins / (len(prefix) * len(wrong))


def leaf_localisation(advantages: list[float], truth: tasks.StepTruth) -> float | None:
    """1 / (lines tied at the lowest mean advantage) if the first wrong line is among them, else 0;
    None for a leaf with no wrong step."""
    first = truth.first_wrong_line
    if first is None:
        return None
    by_line: dict[int, list[float]] = {}
    for a, line in zip(advantages, truth.lines):
        by_line.setdefault(line, []).append(a)
    means = {line: sum(v) / len(v) for line, v in by_line.items()}
    lowest = min(means.values())
    tied = [line for line, m in means.items() if m <= lowest + 1e-9]
    return 1 / len(tied) if first in tied else 0.0


def leaf_truths(
    forests: list[tree.Node], prompts: list[str], decode, step_truth=tasks.arith_step_truth
) -> Callable[[tree.Node], tasks.StepTruth]:
    """The step truth of a leaf's response (the task's: `tasks.arith_step_truth`, or
    `tasks.chat_arith_step_truth` for the chat rendering), computed once per leaf."""
    prompt_of = {id(root): prompt for root, prompt in zip(forests, prompts)}
    known: dict[tree.Node, tasks.StepTruth] = {}

    def truth(leaf: tree.Node) -> tasks.StepTruth:
        if leaf not in known:
            prompt = prompt_of[id(tree.ancestors(leaf)[0])]
            known[leaf] = step_truth(prompt, tree.response_tokens(leaf), decode, leaf.finished)
        return known[leaf]

    return truth


def forks_on_slip(forests: list[tree.Node], truth: Callable[[tree.Node], tasks.StepTruth]) -> tuple[int, int]:
    """(forks that re-sample the first wrong step of the response they were taken from, forks taken
    from a wrong response with a wrong step). A fork is a split segment: its first child is the
    rest of the original response, the forked token the first token of that child."""
    hits = total = 0
    for root in forests:
        for node in tree.walk(root):
            if node is root or len(node.children) < 2:
                continue
            original = tree.leaves(node.children[0])[0]  # the response the fork was taken from
            if original.reward:
                continue
            wrong = [k for k, label in enumerate(truth(original).labels) if label == "first_wrong"]
            if not wrong:
                continue
            offset = len(tree.response_tokens(node))  # the forked token's place in the response
            total += 1
            hits += wrong[0] - 1 <= offset <= wrong[-1]
    return hits, total


def score(
    rollout: treerl.Rollout,
    prompts: list[str],
    decode,
    is_tree: bool,
    aggregation: str = "token",
    step_truth=tasks.arith_step_truth,
) -> dict[str, float]:
    """The measures of one rollout (see the module docstring), and what they were counted on."""
    aurocs, hits, prefix_tokens, penalised, wrong_leaves = [], [], 0, 0, 0
    push = dict.fromkeys(BLAME, 0.0)  # the downward weight on wrong leaves, by part
    truth_of = leaf_truths(rollout.forests, prompts, decode, step_truth)  # shared with forks_on_slip
    for seq in rollout.sequences:
        if seq.reward:
            continue
        wrong_leaves += 1
        truth = truth_of(seq.leaf)
        weight = logprobs.aggregation_weight(len(seq.response_ids), aggregation)  # the loss's w
        for a, label in zip(seq.advantages, truth.labels):
            if label == "prefix":
                prefix_tokens += 1
                penalised += a < 0
            if a < 0:
                push[PART[label]] -= a * weight
        if (auroc := leaf_auroc(seq.advantages, truth.labels)) is not None:
            aurocs.append(auroc)
        if (hit := leaf_localisation(seq.advantages, truth)) is not None:
            hits.append(hit)
    result = {
        "auroc": sum(aurocs) / len(aurocs) if aurocs else None,  # None: nothing to measure it on
        "localisation": sum(hits) / len(hits) if hits else None,
        "collateral": penalised / prefix_tokens if prefix_tokens else None,
        "fork_on_slip": None,
        "wrong_leaves": wrong_leaves,
        "leaves_with_both": len(aurocs),
        "trained_leaves": len(rollout.sequences),
        "tokens_per_prompt": rollout.stats["generated_tokens"] / len(prompts),
        "reward": rollout.stats["reward"],
    }
    total = sum(push.values())
    result.update({part: weight / total if total else None for part, weight in push.items()})
    if is_tree:
        on, forks = forks_on_slip(rollout.forests, truth_of)
        result["fork_on_slip"] = on / forks if forks else None
        result["forks_in_wrong_responses"] = forks
    return result


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------


def chain_count(rollout: treerl.Rollout, prompts: int) -> int:
    """Chains per prompt that cost what a tree rollout generated: its tokens per prompt over the mean
    length of its first-round responses (each tree's leftmost leaf is its original chain)."""
    lengths = [len(tree.response_tokens(leaf)) for root in rollout.forests for leaf in treerl.chain_leaves(root)]
    return max(2, round(rollout.stats["generated_tokens"] / prompts / (sum(lengths) / len(lengths))))


def measure(config: train.Config, args) -> dict[str, list[dict]]:
    """Every source x seed from the policy of --model (or the preset's warm start): per source, one
    result per seed. Points measured before are read from the cache."""
    model_dir = Path(args.model) if args.model else warm_started_policy(args.runs_dir, config.policy, config.task)
    recipe = model_dir / "recipe.json"
    model_id = hashlib.sha1((recipe.read_text() if recipe.exists() else str(model_dir)).encode()).hexdigest()[:12]
    cache = Path(args.out) / "credit_points.jsonl"
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["result"]

    device = policy.pick_device(config.policy)
    model, tokenizer = policy.load_policy(str(model_dir), config.policy, device)
    task = tasks.build_task(config.task, tokenizer, warm_start_pool(config.policy))
    held_out = task.eval[: args.prompts]
    texts = [e.prompt for e in held_out]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    golds = [e.gold for e in held_out]
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers)
    step_truth = tasks.step_truth_on_ids(task, decode)
    aggregation = config.update.aggregation

    results: dict[str, list[dict]] = {name: [] for name in args.sources}
    progress = policy.progress_bar(None, total=len(args.sources) * len(args.seeds), desc=f"credit ({args.stage})")
    for seed in args.seeds:
        # "truth2": the step truth that judges a cut-off last line as far as it goes, and the blame shares
        point = f"{args.stage}|{model_id}|{args.prompts}|{config.rollout.max_new_tokens}|truth2"
        keys = {name: f"{point}|{name}|{seed}" for name in [*SOURCES, "chains-equal-tokens"]}
        for name in args.sources:
            if keys[name] not in done:
                fresh = [keys[name]]
                cfg = treerl.RolloutConfig(**{**vars(config.rollout), **SOURCES[name]})
                if cfg.algo == "chainrl":  # as many chains as cost what treerl-nll generated
                    if keys["chains-equal-tokens"] not in done:
                        fresh.append(keys["chains-equal-tokens"])
                        nll = treerl.RolloutConfig(**vars(config.rollout))
                        torch.manual_seed(seed)
                        reference = treerl.rollout(backend, prompts, golds, task.score, decode, nll, seed, answer_start)
                        done[keys["chains-equal-tokens"]] = {"M": chain_count(reference, len(prompts))}
                    cfg.M = done[keys["chains-equal-tokens"]]["M"]
                cfg.validate()
                torch.manual_seed(seed)
                result = treerl.rollout(
                    backend, prompts, golds, task.score, decode, cfg, seed, answer_start, step_truth
                )
                measured = score(result, texts, decode, cfg.algo == "treerl", aggregation, task.step_truth)
                done[keys[name]] = {**measured, "M": cfg.M}
                if name == "treerl-nll":  # the same rollout the chains' count comes from
                    done[keys["chains-equal-tokens"]] = {"M": chain_count(result, len(prompts))}
                    fresh.append(keys["chains-equal-tokens"])
                cache.parent.mkdir(parents=True, exist_ok=True)
                with cache.open("a") as f:
                    for k in fresh:
                        f.write(json.dumps({"key": k, "result": done[k]}) + "\n")
            results[name].append({"seed": seed, **done[keys[name]]})
            progress.update()
    progress.close()
    return results


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (None values, e.g. no wrong leaf, left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "low": None, "high": None, "seeds": 0}
    mean, low, high = t_interval(values)
    return {"mean": mean, "low": low, "high": high, "seeds": len(values)}


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for name, per_seed in results.items():
        entry = {metric: interval([s[metric] for s in per_seed]) for metric in METRICS + BLAME}
        entry["tokens_per_prompt"] = mean_std([s["tokens_per_prompt"] for s in per_seed])[0]
        entry["M"] = per_seed[0]["M"]
        entry["wrong_leaves_per_seed"] = mean_std([s["wrong_leaves"] for s in per_seed])[0]
        entry["per_seed"] = per_seed
        summary[name] = entry
    return summary


def plot(stages: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.2 * (len(METRICS) + 1), 4.4))
    names = [name for name in SOURCES if any(name in summary for summary in stages.values())]  # measured ones
    width = 0.8 / max(len(stages), 1)

    def x_of(i: int, s: int) -> float:  # source i's bar for stage s: the stages side by side
        return i + (s - (len(stages) - 1) / 2) * width

    for s, (stage, summary) in enumerate(stages.items()):
        for ax, metric in zip(axes, METRICS):
            xs, ys, errs = [], [], []
            for i, name in enumerate(names):
                entry = summary.get(name, {}).get(metric)
                if entry and entry["mean"] is not None:
                    xs.append(x_of(i, s))
                    ys.append(entry["mean"])
                    errs.append([[entry["mean"] - entry["low"]], [entry["high"] - entry["mean"]]])
            if xs:
                yerr = [[e[0][0] for e in errs], [e[1][0] for e in errs]]
                ax.bar(xs, ys, width, yerr=yerr, capsize=3, label=stage)
    plot_blame(axes[-1], stages, names, x_of, width)
    for ax, title in zip(axes, [*METRICS, "where the push on wrong leaves lands"]):
        ax.set_title(title)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")  # AUROC of no separation
    handles, labels = next(
        (ax.get_legend_handles_labels() for ax in axes if ax.get_legend_handles_labels()[0]), ([], [])
    )
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Per-token advantages against the step truth (95% intervals over seeds)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_blame(ax, stages: dict[str, dict], names: list[str], x_of, width: float) -> None:
    """Where the downward push on wrong leaves lands: one stacked bar per source and stage, the
    shares on the correct prefix, the slip and the lines after it (stages side by side, as in the
    other panels; each part keeps its colour)."""
    colours = {"blame_prefix": "tab:green", "blame_slip": "tab:red", "blame_after": "tab:grey"}
    for s, summary in enumerate(stages.values()):
        for i, name in enumerate(names):
            entry = summary.get(name, {})
            if not all(entry.get(part, {}).get("mean") is not None for part in BLAME):
                continue
            bottom = 0.0
            for part in BLAME:
                label = part.removeprefix("blame_")
                ax.bar(x_of(i, s), entry[part]["mean"], width, bottom=bottom, color=colours[part], label=label)
                bottom += entry[part]["mean"]
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per part
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")


def print_table(stages: dict[str, dict]) -> None:
    for measures in (METRICS, BLAME):
        rows = []
        for stage, summary in stages.items():
            for name, entry in summary.items():
                cells = []
                for metric in measures:
                    e = entry.get(metric)
                    cells.append(
                        "n/a" if not e or e["mean"] is None else f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"
                    )
                rows.append([stage, name, entry["M"], f"{entry['tokens_per_prompt']:.0f}", *cells])
        print(markdown_table(["stage", "source", "M", "tokens/prompt", *measures], rows))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other flags are passed to train.py (--config, task, ...)."
    )
    parser.add_argument("--model", default="", help="policy folder (default: the preset's warm start)")
    parser.add_argument("--stage", default="warm-start", help="name of this policy in credit.json")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated sampling seeds")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, from: " + ", ".join(SOURCES))
    parser.add_argument("--out", default="results", help="folder for credit.json/.png and the points")
    parser.add_argument("--runs_dir", default="runs/experiments", help="where the warm start is cached")
    parser.add_argument("--quick", action="store_true", help="4 prompts, the first seed (for tests)")
    args, train_args = parser.parse_known_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(args.sources) - set(SOURCES))
    if unknown:
        parser.error(f"--sources: unknown {', '.join(unknown)} (choose from {', '.join(SOURCES)})")
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    if args.quick:
        args.prompts, args.seeds = min(args.prompts, 4), args.seeds[:1]
    return args, train_args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = parse_args(argv)
    config = train.parse_config(train_args)
    if config.task.task not in ("arith", "arith_chat"):
        raise SystemExit("eval.credit: the step truth exists for the arithmetic task only (--task arith or arith_chat)")
    started = time.perf_counter()
    out = Path(args.out)
    results = measure(config, args)
    path = out / "credit.json"
    payload = json.loads(path.read_text()) if path.exists() else {"stages": {}}
    earlier = payload["stages"].get(args.stage, {}).get("sources", {})  # other sources of this stage stay
    payload["stages"][args.stage] = {
        "model": args.model or "warm start",
        "prompts": args.prompts,
        "seeds": args.seeds,
        "M, N, L, T": [config.rollout.M, config.rollout.N, config.rollout.L, config.rollout.T],
        "sources": {**earlier, **summarise(results)},
        "machine": machine(),
        "commit": commit(),  # the file's own commit is the first stage's; later stages name theirs
        "wall_seconds": time.perf_counter() - started,
        "command": "python -m eval.credit " + " ".join(argv),
    }
    write_json(path, payload)
    stages = {stage: entry["sources"] for stage, entry in payload["stages"].items()}
    plot(stages, out / "credit.png")
    print_table(stages)
    print(f"{time.perf_counter() - started:.0f} s; wrote {path} and {out / 'credit.png'}")
    return payload


if __name__ == "__main__":
    main()
