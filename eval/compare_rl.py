"""Experiment 2 of the paper: does TreeRL train better than ChainRL for the same generation cost?

    python -m eval.compare_rl --config configs/cpu_long.yaml --out results/long --runs_dir runs/long \
        [--seeds 0,1,2,3,4] [--budget 600000] [--max_steps N] [--methods treerl,chainrl-grpo,oracle,...]
        [--lr_sweep 1e-5,3e-5,1e-4 --sweep_seeds 100,101] [--lrs treerl=3e-5,...] [--kl_coef 0]
        [--jobs 2] [--quick] [train.py flags]

Every method starts from the same warm-started policy (made and cached by train.py's warm start for
the task of the flags) and trains until it has generated `--budget` tokens: generation is what a
tree search saves, so methods are compared at equal generated tokens, not equal steps. Methods:

  treerl             EPTree (M=4, N=2, L=1, T=2; NLL forks) + process rewards (GA + LA, 1/sqrt): the paper
  chainrl-grpo       12 independent chains per prompt (about a TreeRL step's tokens), GRPO advantages
  chainrl-release    ChainRL as the authors' release runs it: RLOO advantages with the lower clamp
                     (a wrong answer's advantage is at least -1) and -1 for a truncated answer
  chainrl-drgrpo     12 chains with Dr. GRPO advantages (no division by the group's std)
  treerl-random      ablation: fork at random tokens instead of the least likely ones
  treerl-ga-only     ablation: global advantage V(s) - V(root) only (Eq. 2)
  treerl-la-only     ablation: local advantage V(s) - V(parent) only (Eq. 3)
  treerl-no-sqrt     ablation: no 1/sqrt(|L(s)|) re-weighting
  oracle             chainrl-grpo with each wrong leaf's advantage mass on its first wrong line
                     (--blame oracle; --task arith or arith_chat): what perfect localisation buys at GRPO's
                     magnitudes; not an upper bound on credit assignment in general
  placebo            the same mass on a random line of the same leaf (--blame placebo)
  treerl-fork-line   TreeRL with each forked segment's reward on its first line (--fork_credit
                     fork_line: where the fork's choice was made), its mass kept
  treerl-fork-line-local  the same with only the local part V(s) - V(parent) moved (--fork_credit
                     fork_line_local); the global part stays on every token

The KL: the paper trains without one, and so does this comparison by default (--kl_coef 0; a
preset's kl_coef is overridden). A KL term is weighed against the policy gradient, whose size
differs by method (GRPO's advantages are divided by the group's spread, TreeRL's are not), so one
coefficient for all would hold some methods harder to the start than others. With --kl_coef c > 0,
each method's coefficient is c times its own mean |advantage| per (leaf, token) pair, measured on
four rollouts of the warm start; the coefficients are recorded. Every run logs, per step, that mean
|advantage|, the KL, and the norms of the policy-gradient and KL parts of its gradient
(--log_grad_parts); each evaluation point carries their means over the steps before it.

The learning rate is chosen, not inherited, by one rule for every method: `--lr_sweep` first trains
every method once per rate on each of `--sweep_seeds` (seeds the comparison does not use; these
runs are evaluated only before and after training) and keeps, per method, the rate with the best
final avg@k, mean over the sweep's seeds, among those that do not lose greedy accuracy (final
greedy >= start greedy - 2 points; if none, the rate that loses the least greedy accuracy). `--lrs
method=rate,...` sets rates by hand; otherwise `--lr` is used (default: the preset's, else train.py's).

Each run is an ordinary train.py run (its folder holds metrics.jsonl, metrics.png, summary.json,
and a checkpoint every --save_every steps, so an interrupted run resumes from its last one;
--drop_checkpoints deletes a finished run's checkpoints, which a real model's runs fill a disk with);
re-running the script skips the runs already recorded in <out>/compare_rl.json or finished in --runs_dir.
Held-out accuracy is avg@k at the rollout temperature and greedy accuracy, on the same held-out
problems for every run. The summary gives, per method, start and final accuracy (mean ± sd over
seeds) and the balance fields above; the differences are TreeRL - each other method, and each of the
oracle, the placebo and the fork-line variants - chainrl-grpo, of the final accuracies: the mean with a bootstrap 95% interval over seeds
(each method's seeds resampled independently) and a Welch t 95% interval. A difference is resolved
when its interval excludes 0. The same comparison is read a second time at equal responses trained
on (`at_equal_trained_sequences`: each run's accuracy where the run that trained on the fewest
responses stopped, interpolated between evaluations; null when runs were evaluated only at their
ends), since a tree's leaves share their prefixes
and so, at equal generated tokens, TreeRL trains on more responses than chains do. Writes
<out>/compare_rl.json (one row per evaluation point: method, seed, generated_tokens,
trained_sequences, accuracy, greedy_accuracy, the balance fields, run_seconds; run_seconds is also
summed per experiment: the cost of the runs however many invocations they took, where wall_seconds
is the last invocation's), a PNG of accuracy against generated tokens (mean over
seeds, band = ± sd) and, after a sweep, <out>/compare_rl_sweep.png (final accuracy against the
rate), and prints Markdown tables. Unknown flags go to every train.py run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import run_folder
import train
from eval.common import (
    machine,
    markdown_table,
    mean_std,
    parse_seeds,
    warm_start_pool,
    warm_started_policy,
    welch_interval,
    write_json,
)

CHAINS = ["--algo", "chainrl", "--M", "12"]
METHODS = {
    "treerl": [],
    "chainrl-grpo": [*CHAINS, "--advantage", "grpo"],
    "chainrl-release": [*CHAINS, "--advantage", "rloo", "--clamp_advantages", "true", "--truncated_penalty", "-1"],
    "chainrl-drgrpo": [*CHAINS, "--advantage", "drgrpo"],
    "treerl-random": ["--fork_score", "random"],
    "treerl-ga-only": ["--use_local", "false"],
    "treerl-la-only": ["--use_global", "false"],
    "treerl-no-sqrt": ["--reweight", "none"],
    "oracle": [*CHAINS, "--advantage", "grpo", "--blame", "oracle"],
    "placebo": [*CHAINS, "--advantage", "grpo", "--blame", "placebo"],
    "treerl-fork-line": ["--fork_credit", "fork_line"],
    "treerl-fork-line-local": ["--fork_credit", "fork_line_local"],
}
DEFAULT_METHODS = "treerl,chainrl-grpo,chainrl-release,treerl-random"
# Each experiment is also compared with ChainRL-GRPO: the oracle and placebo move its advantages, and
# the fork-line variants are asked whether they beat it.
VERSUS_GRPO = ("oracle", "placebo", "treerl-fork-line", "treerl-fork-line-local")
BALANCE = ("mean_abs_advantage", "kl", "pg_grad_norm", "kl_grad_norm")  # what a KL is weighed against
GREEDY_TOLERANCE = 0.02  # the sweep keeps rates whose final greedy accuracy is within this of the start


def settings(train_args: list[str]) -> dict:
    """What train.py makes of the flags given to every run (a --config preset read in full)."""
    return json.loads(json.dumps(train.parse_config(train_args).as_dict()))


def run_key(row: dict) -> tuple:
    """The run an evaluation point belongs to: (method, seed, lr)."""
    return row["method"], row["seed"], row["lr"]


def recorded_runs(out: Path, args, train_args: list[str]) -> dict[tuple, list[dict]]:
    """The runs an earlier invocation already wrote to <out>/compare_rl.json with the same budget and
    train.py settings, by (method, seed, lr): the JSON is the record, so a comparison can continue on
    another machine (or after the run folders are gone) without training them again."""
    path = out / "compare_rl.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    # The settings that define a run (run_folder.NOT_DEFINING aside, e.g. a preset's run_name; a flag
    # newer than the record counts there as its default).
    differences = run_folder.settings_differences(saved.get("settings", {}), train.parse_config(train_args))
    if saved.get("budget_tokens") != args.budget or differences:
        return {}
    runs = {}
    for r in saved["rows"] + saved.get("lr_sweep", {}).get("rows", []) + saved.get("other_recorded_rows", []):
        runs.setdefault(run_key(r), []).append(r)
    return runs


def train_one(
    method: str,
    seed: int,
    lr: float,
    args,
    warm_dir: Path,
    train_args: list[str],
    run_name: str | None = None,
    eval_every: int | None = None,
) -> list[dict]:
    """One train.py run from the warm start; returns its evaluation points (every `eval_every` steps,
    default --eval_every; 0: only before and after training). A run already recorded
    in the results, or finished in its folder, with the same train.py command is read back
    instead of trained again; an unfinished one resumes from its last checkpoint, and one made with
    other settings is started afresh."""
    if (method, seed, lr) in args.recorded:
        return args.recorded[method, seed, lr]
    run_name = run_name or f"{method}-seed{seed}"
    run_dir = Path(args.runs_dir) / run_name
    argv = [
        *train_args,
        *METHODS[method],
        "--model",
        str(warm_dir),
        "--warmup_steps",
        "0",
        "--seed",
        str(seed),
        "--output_dir",
        args.runs_dir,
        "--run_name",
        run_name,
        "--lr",
        str(lr),
        "--steps",
        str(args.max_steps),
        "--max_generated_tokens",
        str(args.budget),
        "--eval_every",
        str(args.eval_every if eval_every is None else eval_every),
        "--save_every",
        str(args.save_every),
        "--save_trees",
        "false",
        "--resume",
        "true",
        "--kl_coef",
        str(args.kl_coefs.get(method, 0.0)),
        "--log_grad_parts",
        "true",
    ]
    made_with = run_dir / "compare_rl_argv.json"  # what the folder's run was started with
    if run_dir.exists() and (not made_with.exists() or json.loads(made_with.read_text()) != argv):
        shutil.rmtree(run_dir)
    if not (run_dir / "summary.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        made_with.write_text(json.dumps(argv))
        train.main(argv)
    if args.drop_checkpoints:  # the run is finished: nothing will resume from them
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["step"] > 0]
    seconds = sum(m["time_rollout"] + m["time_verify"] + m["time_update"] + m["time_sync"] for m in steps)
    run_seconds = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]  # summed over resumes
    points, since = [], []  # since: the steps after the evaluation before
    trained = 0  # responses trained on so far (a step's leaves, less those of groups without signal)
    for m in metrics:
        if m["step"] > 0 and "time_rollout" in m:
            since.append(m)
            trained += m["sequences"]
        if "eval_sampled" not in m:
            continue
        point = {
            "method": method,
            "seed": seed,
            "lr": lr,
            "step": m["step"],
            "generated_tokens": m.get("generated_tokens_total", 0),
            "trained_sequences": trained,
            "accuracy": m["eval_sampled"],
            "greedy_accuracy": m["eval_greedy"],
            "seconds_per_step": seconds / max(len(steps), 1),
            "run_seconds": run_seconds,
        }
        # The balance of the update over the steps since the evaluation before (none at the start).
        for key in BALANCE:
            values = [x[key] for x in since if key in x]
            point[key] = sum(values) / len(values) if values else None
        points.append(point)
        since = []
    return points


def advantage_scale(method: str, warm_dir: Path, train_args: list[str], seed: int, batches: int = 4) -> float:
    """`method`'s mean |advantage| per (leaf, token) pair at the warm start, over `batches` rollouts
    of a step's worth of training prompts drawn with `seed`."""
    import torch

    import policy
    import tasks
    import treerl
    from hf_backend import HFBackend

    config = train.parse_config([*train_args, *METHODS[method]])
    device = policy.pick_device(config.policy)
    model, tokenizer = policy.load_policy(str(warm_dir), config.policy, device)
    task = tasks.build_task(config.task, tokenizer, warm_start_pool(config.policy))
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, config.run.gen_batch_size)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers) if task.answer_markers else None
    step_truth = tasks.step_truth_on_ids(task, decode)
    total = pairs = 0.0
    for step in range(1, batches + 1):
        step_seed, examples, prompts = train.step_prompts(task, tokenizer, seed, step, config.run.prompts_per_step)
        torch.manual_seed(step_seed)
        result = treerl.rollout(
            backend, prompts, [e.gold for e in examples], task.score, decode, config.rollout, step_seed,
            answer_start, step_truth,
        )  # fmt: skip
        total += sum(abs(a) for seq in result.sequences for a in seq.advantages)
        pairs += sum(len(seq.advantages) for seq in result.sequences)
    return total / max(pairs, 1)


def total_run_seconds(rows: list[dict]) -> float:
    """The wall time of the runs behind `rows`, each counted once: what the experiment cost, however
    many invocations it took (wall_seconds is only the last invocation's)."""
    return sum({run_key(r): r["run_seconds"] for r in rows}.values())


def sweep_finals(sweep_rows: list[dict], method: str) -> dict[float, dict[str, float]]:
    """`method`'s sweep, rate by rate: the start and final avg@k and greedy accuracy, each a mean
    over the sweep's seeds."""
    runs: dict[float, dict[int, list[dict]]] = {}
    for r in sweep_rows:  # in step order
        if r["method"] == method:
            runs.setdefault(r["lr"], {}).setdefault(r["seed"], []).append(r)
    finals = {}
    for lr, by_seed in runs.items():
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        finals[lr] = {
            f"{when}_{key}": mean([points[k][key] for points in by_seed.values()])
            for when, k in (("start", 0), ("final", -1))
            for key in ("accuracy", "greedy_accuracy")
        }
    return finals


def choose_lr(sweep_rows: list[dict], method: str) -> float:
    """The sweep's choice for `method`, one rule for every method, on means over the sweep's seeds:
    the best final avg@k among the rates that keep greedy accuracy (final >= start -
    GREEDY_TOLERANCE); if no rate does, the one that loses least of it."""
    finals = sweep_finals(sweep_rows, method)
    keeps_greedy = [
        lr for lr, f in finals.items() if f["final_greedy_accuracy"] >= f["start_greedy_accuracy"] - GREEDY_TOLERANCE
    ]
    if not keeps_greedy:
        return max(finals, key=lambda lr: finals[lr]["final_greedy_accuracy"])
    return max(keeps_greedy, key=lambda lr: finals[lr]["final_accuracy"])


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(jobs: list[tuple], args, warm_dir: Path, train_args: list[str], eval_every: int | None = None):
    """Yield each job's evaluation points, (method, seed, lr, run_name) per job, as runs finish:
    one after another, or `--jobs` at once in worker processes with one torch thread each."""
    if args.jobs == 1:
        for method, seed, lr, run_name in jobs:
            yield train_one(method, seed, lr, args, warm_dir, train_args, run_name, eval_every)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
    ) as pool:
        futures = [
            pool.submit(train_one, method, seed, lr, args, warm_dir, train_args, run_name, eval_every)
            for method, seed, lr, run_name in jobs
        ]
        for future in as_completed(futures):
            yield future.result()


def bootstrap_difference(
    a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its bootstrap 95% interval, resampling each list's seeds independently."""
    rng = random.Random(seed)
    diffs = sorted(
        sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b) for _ in range(resamples)
    )
    return sum(a) / len(a) - sum(b) / len(b), diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: start and final avg@k and greedy accuracy (mean, sd over seeds), gains, cost."""
    table = []
    for method in methods:
        runs = {}
        for r in rows:
            if r["method"] == method:
                runs.setdefault(r["seed"], []).append(r)
        entry = {"method": method, "seeds": len(runs), "lr": next(iter(runs.values()))[0]["lr"]}
        for key, name in (("accuracy", "accuracy"), ("greedy_accuracy", "greedy")):
            first = [points[0][key] for points in runs.values()]
            last = [points[-1][key] for points in runs.values()]
            entry[f"{name}_start"] = mean_std(first)[0]
            entry[f"{name}_final"], entry[f"{name}_final_std"] = mean_std(last)
            entry[f"{name}_gain"], entry[f"{name}_gain_std"] = mean_std([b - a for a, b in zip(first, last)])
        for key in ("step", "generated_tokens", "seconds_per_step"):
            entry[key if key != "step" else "steps"] = mean_std([points[-1][key] for points in runs.values()])[0]
        for key in BALANCE:  # over every step of every seed (each evaluation interval weighs alike)
            values = [p[key] for points in runs.values() for p in points if p.get(key) is not None]
            entry[key] = mean_std(values)[0] if values else None
        table.append(entry)
    return table


def differences(rows: list[dict], methods: list[str]) -> list[dict]:
    """TreeRL (or, without it, the first TreeRL variant) - each other method (the ChainRL baselines,
    then the ablations), and each experiment of VERSUS_GRPO - chainrl-grpo: final avg@k and greedy accuracy, the mean difference with a bootstrap 95%
    interval (each method's seeds resampled independently) and a Welch t 95% interval."""

    def finals(method, key):
        runs = {}
        for r in rows:
            if r["method"] == method:
                runs[r["seed"]] = r[key]  # rows are in step order, so the last one stays
        return list(runs.values())

    pairs = []
    base = "treerl" if "treerl" in methods else next((m for m in methods if m.startswith("treerl")), None)
    if base is not None:
        others = sorted((m for m in methods if m != base), key=lambda m: not m.startswith("chainrl"))
        pairs += [(base, other) for other in others]
    if "chainrl-grpo" in methods:
        pairs += [(m, "chainrl-grpo") for m in methods if m in VERSUS_GRPO]
    out = []
    for a_method, b_method in pairs:
        entry = {"comparison": f"{a_method} - {b_method}"}
        for key, name in (("accuracy", "accuracy"), ("greedy_accuracy", "greedy")):
            a, b = finals(a_method, key), finals(b_method, key)
            entry[name], entry[f"{name}_low"], entry[f"{name}_high"] = bootstrap_difference(a, b)
            if min(len(a), len(b)) > 1:
                _, entry[f"{name}_t_low"], entry[f"{name}_t_high"] = welch_interval(a, b)
        out.append(entry)
    return out


def at_equal(rows: list[dict], methods: list[str], axis: str) -> dict | None:
    """A second reading of the comparison at an equal amount of `axis` (e.g. "trained_sequences")
    instead of equal generated tokens: every run's avg@k and greedy accuracy at the least final
    `axis` of any run, interpolated linearly between its evaluations, then summarised and compared as
    the final accuracies are. None where a row lacks the field (runs recorded before it was), and
    where a run was evaluated only at its start and its end (`--eval_every 0`): a straight line
    between those two is a guess, not a reading."""
    runs = {}
    for r in rows:
        runs.setdefault((r["method"], r["seed"]), []).append(r)
    if not runs or any(axis not in r for r in rows) or any(len(points) < 3 for points in runs.values()):
        return None
    at = min(points[-1][axis] for points in runs.values())
    read = []
    for (method, seed), points in runs.items():
        xs = [p[axis] for p in points]
        row = {"method": method, "seed": seed}
        for key in ("accuracy", "greedy_accuracy"):
            row[key] = float(np.interp(at, xs, [p[key] for p in points]))
        read.append(row)
    summary = []
    for method in methods:
        entry = {"method": method}
        for key, name in (("accuracy", "accuracy"), ("greedy_accuracy", "greedy")):
            entry[name], entry[f"{name}_std"] = mean_std([r[key] for r in read if r["method"] == method])
        summary.append(entry)
    return {"axis": axis, "at": at, "summary": summary, "differences": differences(read, methods)}


def print_differences(diffs: list[dict], title: str) -> None:
    """The differences as a Markdown table: the mean, and its bootstrap and Welch t 95% intervals."""
    if not diffs:
        return

    def interval(d: dict, key: str) -> str:  # key: "accuracy" (bootstrap) or "accuracy_t" (Welch t)
        low = d.get(f"{key}_low")
        return "n/a" if low is None else f"[{low:+.3f}, {d[f'{key}_high']:+.3f}]"

    rows = [
        [f"{d['comparison']} ({label})", f"{d[name]:+.3f}", interval(d, name), interval(d, f"{name}_t")]
        for d in diffs
        for name, label in (("accuracy", "avg@k"), ("greedy", "greedy"))
    ]
    print(f"\n{title}")
    print(markdown_table(["difference", "mean", "bootstrap 95%", "Welch t 95%"], rows))


def plot(rows: list[dict], methods: list[str], budget: int, out: Path) -> None:
    """Held-out avg@k and greedy accuracy per method: curves along the generated tokens (mean ± sd
    over seeds), or, where runs were evaluated only before and after (--eval_every 0), where a curve
    would be a straight line, each seed's final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    only_ends = max(Counter(map(run_key, rows)).values()) <= 2  # per run: the start and the final
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "accuracy", "held-out avg@k (rollout temperature)"),
        (axes[1], "greedy_accuracy", "held-out greedy accuracy"),
    ):
        (draw_finals if only_ends else draw_curves)(ax, rows, methods, key, budget)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right" if only_ends else "best")
    what = "final accuracy, one dot per seed, bar: mean" if only_ends else "mean ± sd over seeds"
    fig.suptitle(f"TreeRL vs ChainRL at equal generated tokens ({what})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_curves(ax, rows: list[dict], methods: list[str], key: str, budget: int) -> None:
    grid = np.linspace(0, budget, 21)
    for method in methods:
        curves = []
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            points = [r for r in rows if r["method"] == method and r["seed"] == seed]
            curves.append(np.interp(grid, [p["generated_tokens"] for p in points], [p[key] for p in points]))
        curves = np.array(curves)
        mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))
        style = "-" if method in ("treerl", "chainrl-grpo", "chainrl-release") else "--"
        ax.plot(grid, mean, style, label=method)
        ax.fill_between(grid, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("generated tokens (RL)")


def draw_finals(ax, rows: list[dict], methods: list[str], key: str, budget: int) -> None:
    for i, method in enumerate(methods):
        finals = [r[key] for r in rows if r["method"] == method and r["step"] > 0]
        [dots] = ax.plot([i] * len(finals), finals, "o", alpha=0.6)  # named by the x axis
        ax.hlines(np.mean(finals), i - 0.25, i + 0.25, color=dots.get_color(), lw=2)
    # The start differs by seed only through the evaluation's samples: its mean over the runs.
    ax.axhline(np.mean([r[key] for r in rows if r["step"] == 0]), ls=":", color="gray", label="start")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_xlabel(f"after {budget:,} generated tokens")


def plot_sweep(sweep_rows: list[dict], rates: dict[str, float], out: Path) -> None:
    """The learning-rate sweep: final avg@k and greedy accuracy against the rate, one line per method,
    its chosen rate circled, the start as a dotted line and the greedy floor the choice keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in sweep_rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "accuracy", "final held-out avg@k"),
        (axes[1], "greedy_accuracy", "final held-out greedy accuracy"),
    ):
        for method in methods:
            finals = sweep_finals(sweep_rows, method)
            lrs = sorted(finals)
            [line] = ax.plot(lrs, [finals[lr][f"final_{key}"] for lr in lrs], "o-", label=method)
            if rates.get(method) in finals:
                chosen = finals[rates[method]][f"final_{key}"]
                ax.plot(rates[method], chosen, "o", ms=14, mfc="none", color=line.get_color())
        # Every run starts from the same warm start; its accuracy differs by seed (the evaluation's
        # samples), so the line is the mean over the sweep's seeds, as the finals are.
        starts = {r["seed"]: r[key] for r in sweep_rows if r["step"] == 0}
        start = sum(starts.values()) / len(starts)
        ax.axhline(start, ls=":", color="gray", label="start")
        if key == "greedy_accuracy":
            ax.axhline(start - GREEDY_TOLERANCE, ls="--", color="gray", lw=0.8, label="greedy floor of the choice")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    seeds = ", ".join(str(seed) for seed in sorted({r["seed"] for r in sweep_rows}))
    fig.suptitle(f"Learning-rate sweep (mean over seeds {seeds}); circled: the rate each method is compared at")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_rates(parser, text: str, methods: list[str]) -> dict[str, float]:
    """--lrs "treerl=3e-5,chainrl-grpo=1e-5" as {method: rate}."""
    rates = {}
    for item in filter(None, text.split(",")):
        method, _, rate = item.partition("=")
        if method not in METHODS:
            parser.error(f"--lrs: unknown method {method!r}")
        try:
            rates[method] = float(rate)
        except ValueError:
            parser.error(f"--lrs: {item!r} is not method=rate")
    return rates


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other flags are passed to every train.py run."
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated RL seeds")
    parser.add_argument("--budget", type=int, default=200_000, help="generated tokens per run")
    parser.add_argument(
        "--max_steps",
        type=int,
        default=100_000,
        help="steps at most, should the budget last longer (train.py's --steps; for the arithmetic tasks it "
        "also sizes the pool of training problems, drawn as a pool of that many steps' prompts)",
    )
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated or 'all', from: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="RL learning rate where neither --lrs nor --lr_sweep sets one "
        "(default: the --config preset's, else train.py's)",
    )
    parser.add_argument("--lrs", default="", help="per-method rates, e.g. treerl=3e-5,chainrl-grpo=1e-5")
    parser.add_argument(
        "--lr_sweep", default="", help="comma-separated rates to choose from, per method, on --sweep_seeds"
    )
    parser.add_argument(
        "--sweep_seeds", default="100,101", help="the seeds of the learning-rate sweep (not comparison seeds)"
    )
    parser.add_argument(
        "--kl_coef",
        type=float,
        default=0.0,
        help="KL weight per unit of advantage: each method's k3 KL coefficient is this times its own mean "
        "|advantage| per (leaf, token) pair at the warm start (0: no KL, the paper's setting; a preset's "
        "kl_coef is overridden)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="train.py runs at once, each in its own process with one torch thread"
    )
    parser.add_argument(
        "--eval_every", type=int, default=10, help="held-out evaluation every this many steps (0: before and after)"
    )
    parser.add_argument(
        "--save_every", type=int, default=None, help="checkpoint every this many steps (default: --eval_every)"
    )
    parser.add_argument(
        "--drop_checkpoints", action="store_true", help="delete a run's checkpoints once it has finished"
    )
    parser.add_argument("--out", default="results", help="folder for compare_rl.json/.png")
    parser.add_argument("--runs_dir", default="runs/experiments", help="folder of the warm start and the runs")
    parser.add_argument(
        "--quick", action="store_true", help="treerl and chainrl-grpo, one seed, 1/10 of the budget (for tests)"
    )
    args, train_args = parser.parse_known_args(argv)
    args.seeds = parse_seeds(parser, args.seeds)
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    args.lrs = parse_rates(parser, args.lrs, args.methods)
    try:
        args.lr_sweep = [float(x) for x in args.lr_sweep.split(",") if x]
    except ValueError:
        parser.error(f"--lr_sweep must be comma-separated numbers, got {args.lr_sweep!r}")
    args.sweep_seeds = parse_seeds(parser, args.sweep_seeds)
    if set(args.sweep_seeds) & set(args.seeds) and args.lr_sweep:
        parser.error(f"--sweep_seeds {args.sweep_seeds} share a seed with --seeds; choose seeds outside them")
    if args.kl_coef < 0:
        parser.error(f"--kl_coef must be >= 0, got {args.kl_coef}")
    if args.quick:
        args.methods, args.seeds, args.budget = ["treerl", "chainrl-grpo"], args.seeds[:1], args.budget // 10
    if args.budget < 1:
        parser.error(f"--budget must be >= 1, got {args.budget}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.save_every = args.eval_every if args.save_every is None else args.save_every
    for name in ("eval_every", "save_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args, train_args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = parse_args(argv)
    train_args = [*train_args, "--kl_coef", "0"]  # a preset's KL is replaced by each run's own (train_one)
    started = time.perf_counter()
    config = train.parse_config(train_args)
    if config.update.lr_warmup_ratio > 0:  # a share of --steps, which a token budget leaves open-ended
        raise SystemExit(
            "compare_rl: --lr_warmup_ratio needs a fixed --steps; runs here stop at a token "
            "budget (use --lr_warmup_steps)"
        )
    warm_dir = warm_started_policy(args.runs_dir, config.policy, config.task, config.run.seed)
    # A KL is weighed against the policy gradient, whose size differs by method: each method's
    # coefficient is --kl_coef times its own mean |advantage| at the warm start (or 0: no KL).
    args.start_scales = {}
    if args.kl_coef > 0:
        args.start_scales = {m: advantage_scale(m, warm_dir, train_args, args.sweep_seeds[0]) for m in args.methods}
    args.kl_coefs = {m: args.kl_coef * args.start_scales.get(m, 0.0) for m in args.methods}
    out = Path(args.out)
    args.recorded = recorded_runs(out, args, train_args)
    sweep_rows, rows, rates = [], [], dict(args.lrs)

    def save() -> dict:
        """Write the results so far (after every run: an interrupted comparison keeps them), in
        method, seed (or rate), step order whatever order the runs finished in."""
        rows.sort(key=lambda r: (args.methods.index(r["method"]), r["seed"], r["step"]))
        sweep_rows.sort(key=lambda r: (args.methods.index(r["method"]), r["lr"], r["step"]))
        methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
        used = {run_key(r) for r in rows + sweep_rows}
        result = {
            "command": "python -m eval.compare_rl " + " ".join(argv),
            "machine": machine(),
            "train_args": train_args,
            "settings": settings(train_args),
            "budget_tokens": args.budget,
            "learning_rates": {m: rates[m] for m in args.methods if m in rates},
            "kl": {
                "per_unit_advantage": args.kl_coef,
                "coefficients": {m: args.kl_coefs.get(m, 0.0) for m in args.methods},
                "mean_abs_advantage_at_start": args.start_scales,
            },
            "lr_sweep": {
                "rates": args.lr_sweep,
                "seeds": args.sweep_seeds,
                # per method and rate, means over the sweep's seeds: what the rule chose from
                "finals": [
                    {
                        "method": m,
                        "lr": lr,
                        "seeds": len({r["seed"] for r in sweep_rows if (r["method"], r["lr"]) == (m, lr)}),
                        **f,
                    }
                    for m in args.methods
                    for lr, f in sorted(sweep_finals(sweep_rows, m).items())
                ],
                "rows": sweep_rows,
            },
            "seeds": sorted({r["seed"] for r in rows}),
            "summary": summarise(rows, methods),
            "differences": differences(rows, methods),
            # The same comparison read at equal responses trained on: a tree's leaves share prefixes,
            # so at equal generated tokens TreeRL trains on more responses than chains do.
            "at_equal_trained_sequences": at_equal(rows, methods, "trained_sequences"),
            "rows": rows,
            "wall_seconds": time.perf_counter() - started,
            "run_seconds": {"comparison": total_run_seconds(rows), "lr_sweep": total_run_seconds(sweep_rows)},
            # Runs recorded by an earlier invocation that this one has not (or not yet) used: kept, so
            # that an interrupted sweep or a narrower --methods does not erase them from the record.
            "other_recorded_rows": [r for key, points in args.recorded.items() if key not in used for r in points],
        }
        write_json(out / "compare_rl.json", result)
        if rows:
            plot(rows, methods, args.budget, out / "compare_rl.png")
        return result

    to_sweep = [m for m in args.methods if m not in rates] if args.lr_sweep else []
    sweep_jobs = [
        (m, seed, lr, f"sweep-{m}-lr{lr:g}-seed{seed}")
        for seed in args.sweep_seeds
        for m in to_sweep
        for lr in args.lr_sweep
    ]
    # The sweep's rule reads only the final accuracy: its runs evaluate before and after training
    # (an evaluation of 500 problems x 4 samples costs several steps' worth of generation).
    for points in run_all(sweep_jobs, args, warm_dir, train_args, eval_every=0):
        sweep_rows += points
        save()
    rates.update({m: choose_lr(sweep_rows, m) for m in to_sweep})
    if sweep_rows:
        plot_sweep(sweep_rows, rates, out / "compare_rl_sweep.png")
    rates = {m: rates.get(m, config.update.lr if args.lr is None else args.lr) for m in args.methods}
    jobs = [(m, seed, rates[m], None) for seed in args.seeds for m in args.methods]
    for points in run_all(jobs, args, warm_dir, train_args):
        rows += points
        result = save()
    print(
        markdown_table(
            [
                "method",
                "lr",
                "seeds",
                "avg@k start",
                "avg@k final",
                "avg@k gain",
                "greedy start",
                "greedy final",
                "steps",
                "s/step",
            ],
            [
                [
                    t["method"],
                    f"{t['lr']:g}",
                    t["seeds"],
                    f"{t['accuracy_start']:.3f}",
                    f"{t['accuracy_final']:.3f} ± {t['accuracy_final_std']:.3f}",
                    f"{t['accuracy_gain']:+.3f} ± {t['accuracy_gain_std']:.3f}",
                    f"{t['greedy_start']:.3f}",
                    f"{t['greedy_final']:.3f} ± {t['greedy_final_std']:.3f}",
                    f"{t['steps']:.0f}",
                    f"{t['seconds_per_step']:.2f}",
                ]
                for t in result["summary"]
            ],
        )
    )
    print_differences(result["differences"], "Difference of final accuracy:")
    reading = result["at_equal_trained_sequences"]
    if reading:
        at = f"{reading['at']:,} per run, interpolated between evaluations"
        print_differences(reading["differences"], f"Read at equal responses trained on ({at}):")
    print(
        f"budget {args.budget} generated tokens per run; {result['wall_seconds']:.0f} s of wall time now, "
        f"{result['run_seconds']['comparison']:.0f} s in the comparison's runs; "
        f"wrote {out / 'compare_rl.json'} and .png"
    )
    return result


if __name__ == "__main__":
    main()
