"""Where a TreeRL step spends its time, and how close each phase is to what this machine can do.

    python -m eval.throughput [--models default,30m] [--batch 256] [--repeats 3] [--device cpu]
    python -m eval.throughput --models qwen2.5-1.5b --device cuda      # one GPU

For each model it measures the following, with random weights (every response runs to the length
limit, so runs are comparable). Models: the CPU default architecture (0.9M parameters) and a
30M-parameter one, both over the character vocabulary; and, for a GPU, Qwen2.5-1.5B's shapes
(151,936-token vocabulary, bfloat16).

  generation   tokens/s of the transformers backend (`hf_backend.HFBackend`: its decode loop with
               per-prefix budgets, rows leaving the batch, per-token log-prob and entropy) against
               the *limit*: a bare batched decode loop in plain torch on the same model, batch and
               length, with the same in-place KV cache and nothing else in it.
               gen_vs_limit = backend / limit.
  tree vs chain tokens/s of an EPTree forest (M=4, N=2, L=1, T=2) against independent chains of
               about the same total tokens, for the same prompts. tree_vs_chain = forest / chains,
               for train.py's 16 prompts per step and for 64 (where the forest's first round, M=4
               chains per prompt, fills a batch of 256 as the chains do). The forest is grown as
               `treerl.rollout` grows it, forks starting from their prefixes' stored KV states,
               and again re-reading every prefix: fork_prefill_share is the share of the fork
               round that re-reading costs.
  update       training tokens/s (forward + backward) over the leaf sequences of that forest, flat
               (one row per leaf) and tree-packed (`--pack_tree`: one row of unique tokens per
               forest), counted in *leaf-path* tokens, the work the loss stands for.
               packed_speedup = packed / flat; also for a deeper forest (L = 2).

The phase shares of a whole training step (rollout, verification, update, sync) are in every
train.py run's metrics.jsonl (time_* keys); docs/performance.md quotes them. Writes results/throughput.json
and prints a table. Timings are medians over --repeats after one warm-up run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hf_backend
import packing
import policy
import tree
import treerl
from eval.common import machine, markdown_table, write_json
from treerl import UpdateConfig

MODELS = {  # name -> (hidden size, layers, heads); the character vocabulary of train.py
    "default": (128, 4, 4),
    "30m": (512, 9, 8),
}
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
PROMPT_TOKENS = 16
RESPONSE_TOKENS = 64


@dataclass
class Subject:
    """A model to measure, with what the measurements need of its tokenizer."""

    model: torch.nn.Module
    vocab: int  # token ids are drawn from [3, vocab)
    pad: int
    never: int  # an EOS id the model cannot emit: random weights then never stop early
    update_prompts: int  # prompts whose forests the update is timed on


def build(name: str, device: str = "cpu") -> Subject:
    torch.manual_seed(0)
    if name == "qwen2.5-1.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        with torch.device(device):  # 1.5B random weights initialise much faster on a GPU
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN_1_5B, pad_token_id=0)).to(torch.bfloat16)
        subject = Subject(model, QWEN_1_5B["vocab_size"], 0, QWEN_1_5B["vocab_size"], 16)
    else:
        hidden, layers, heads = MODELS[name]
        cfg = policy.PolicyConfig(hidden_size=hidden, num_layers=layers, num_heads=heads)
        tokenizer = policy.build_char_tokenizer()
        model = policy.build_tiny_model(cfg, tokenizer)
        # The 30M model's update is timed on fewer forests: on 2 CPU cores, 16 take minutes.
        subject = Subject(model, len(tokenizer), tokenizer.pad_token_id, len(tokenizer), 16 if name == "default" else 4)
    subject.model = subject.model.to(device).eval()
    return subject


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


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


@torch.no_grad()
def bare_decode(model, batch: torch.Tensor, steps: int) -> int:
    """The limit: prefill, then one forward per token with a KV cache written in place, and
    multinomial sampling; no padding, masks, per-token statistics or stopping."""
    cache = hf_backend.preallocated_kv_cache(model, capacity=batch.shape[1] + steps)
    out = model(input_ids=batch, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    for _ in range(steps):
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return batch.shape[0] * steps


def backend_for(subject: Subject, batch: int) -> hf_backend.HFBackend:
    # Prefix re-use on, whatever the device: the tree-vs-chain comparison times it both ways.
    return hf_backend.HFBackend(subject.model, subject.never, subject.pad, batch_size=batch, reuse_prefixes=True)


def measure_generation(subject: Subject, batch: int, repeats: int) -> dict:
    rows = prompts(batch, subject.vocab)
    device = next(subject.model.parameters()).device
    limit_s, tokens = timed(
        lambda: bare_decode(subject.model, torch.tensor(rows, device=device), RESPONSE_TOKENS), repeats
    )
    backend = backend_for(subject, batch)
    backend_s, groups = timed(lambda: backend.sample(rows, 1, RESPONSE_TOKENS), repeats)
    backend_tokens = sum(len(s.tokens) for g in groups for s in g)
    return {
        "batch": batch,
        "limit_tokens_per_s": tokens / limit_s,
        "backend_tokens_per_s": backend_tokens / backend_s,
        "gen_vs_limit": (backend_tokens / backend_s) / (tokens / limit_s),
    }


def grow(backend, rows, M, N, L, T, seed=0, reuse=True) -> tuple[list[tree.Node], dict[str, float]]:
    """EPTree forests for `rows`, timing the initial chains and the fork rounds apart. With
    `reuse`, forks start from the KV states of their prefix (as `treerl.rollout` does); without,
    every fork prefix is run through the model again."""
    phase = {"chains": 0.0, "forks": 0.0}

    def sample_fn(prefixes, n, budgets):
        started = clock()
        out = backend.sample(prefixes, n, budgets)
        phase["forks" if phase["chains"] else "chains"] += clock() - started
        return out

    torch.manual_seed(seed)
    with backend.reusing_prefixes() if reuse else contextlib.nullcontext():
        forests = tree.eptree_batch(rows, sample_fn, M, N, L, T, seed=seed, max_response_tokens=RESPONSE_TOKENS)
    return forests, phase


def measure_tree_vs_chain(subject: Subject, prompts_per_step: int, batch: int, repeats: int) -> dict:
    """Forest (M=4, N=2, L=1, T=2) against chains of about the same total tokens, for the same
    prompts; the forest with and without re-using its prefixes' KV states."""
    rows = prompts(prompts_per_step, subject.vocab, seed=1)
    backend = backend_for(subject, batch)
    result = {"prompts": len(rows), "batch": batch}
    for reuse in (True, False):
        times, fork_times = [], []
        for seed in range(repeats + 1):  # the first run warms up
            started = clock()
            forests, phase = grow(backend, rows, 4, 2, 1, 2, seed, reuse)
            times.append(clock() - started)
            fork_times.append(phase["forks"])
        tokens = sum(tree.generated_tokens(root) for root in forests)
        name = "forest" if reuse else "forest_no_reuse"
        result[f"{name}_tokens"] = tokens
        result[f"{name}_tokens_per_s"] = tokens / statistics.median(times[1:])
        result[f"{name}_fork_round_seconds"] = statistics.median(fork_times[1:])
    chains = max(1, round(result["forest_tokens"] / (len(rows) * RESPONSE_TOKENS)))
    chain_s, groups = timed(lambda: backend.sample(rows, chains, RESPONSE_TOKENS), repeats)
    chain_tokens = sum(len(s.tokens) for g in groups for s in g)
    result.update(
        {
            "chains_per_prompt": chains,
            "chain_tokens": chain_tokens,
            "chain_tokens_per_s": chain_tokens / chain_s,
            "tree_vs_chain": result["forest_tokens_per_s"] / (chain_tokens / chain_s),
            "tree_vs_chain_no_reuse": result["forest_no_reuse_tokens_per_s"] / (chain_tokens / chain_s),
            # The share of the fork round that re-reading the prefixes costs.
            "fork_prefill_share": 1
            - result["forest_fork_round_seconds"] / result["forest_no_reuse_fork_round_seconds"],
        }
    )
    return result


def training_sequences(forests: list[tree.Node], seed: int = 0) -> list[tree.TrainSequence]:
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


def measure_update(subject: Subject, depth: int, batch: int, repeats: int) -> dict:
    model = subject.model
    device = next(model.parameters()).device
    rows = prompts(subject.update_prompts, subject.vocab, seed=2)
    forests, _ = grow(backend_for(subject, batch), rows, 4, 2, depth, 2)
    sequences = training_sequences(forests)
    leaf_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    result = {
        "L": depth,
        "prompts": len(rows),
        "leaves": len(sequences),
        "leaf_path_tokens": leaf_tokens,
        "unique_over_flat": packing.token_ratio(sequences),
    }
    for name, pack in (("flat", False), ("packed", True)):
        cfg = UpdateConfig(lr=1e-6)
        update = packing.update_packed if pack else treerl.update
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the work, leave the weights
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = timed(functools.partial(update, model, optimizer, None, sequences, cfg, subject.pad), repeats)
        model.zero_grad(set_to_none=True)
        result[f"{name}_leaf_tokens_per_s"] = leaf_tokens / seconds
        result[f"{name}_peak_memory_mb"] = peak_memory_mb(device)
    result["packed_speedup"] = result["packed_leaf_tokens_per_s"] / result["flat_leaf_tokens_per_s"]
    return result


def table_rows(name: str, r: dict) -> list[list[str]]:
    g = r["generation"]
    rows = [
        [
            name,
            f"generation (batch {g['batch']})",
            f"{g['backend_tokens_per_s']:.0f} tok/s",
            f"{g['limit_tokens_per_s']:.0f} tok/s (bare loop)",
            f"{g['gen_vs_limit']:.2f}",
        ]
    ]
    for t in r["tree_vs_chain"]:
        rows.append(
            [
                name,
                f"EPTree vs chains, {t['prompts']} prompts",
                f"{t['forest_tokens_per_s']:.0f} tok/s",
                f"{t['chain_tokens_per_s']:.0f} tok/s (chains)",
                f"{t['tree_vs_chain']:.2f}",
            ]
        )
        rows.append(
            [
                name,
                "same, forks re-read their prefix",
                f"{t['forest_no_reuse_tokens_per_s']:.0f} tok/s",
                f"{t['chain_tokens_per_s']:.0f} tok/s (chains)",
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
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="default,30m", help=f"comma-separated, from: {', '.join([*MODELS, 'qwen2.5-1.5b'])}"
    )
    parser.add_argument("--batch", type=int, default=256, help="generation batch (train.py's gen_batch_size)")
    parser.add_argument("--prompts", default="16,64", help="prompts per step for the tree-vs-chain comparison")
    parser.add_argument(
        "--update_prompts",
        type=int,
        default=0,
        help="prompts whose forests the update is timed on (0: 16, or 4 for the 30M model)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in MODELS and name != "qwen2.5-1.5b":
            parser.error(f"unknown model {name!r}; choose from {', '.join([*MODELS, 'qwen2.5-1.5b'])}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    try:
        prompt_counts = [int(p) for p in args.prompts.split(",")]
    except ValueError:
        parser.error(f"--prompts must be comma-separated integers, got {args.prompts!r}")
    started = time.perf_counter()
    payload = {
        "command": "python -m eval.throughput " + " ".join(argv),
        "machine": machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "prompt_tokens": PROMPT_TOKENS,
        "response_tokens": RESPONSE_TOKENS,
        "models": {},
    }
    table = []
    for name in names:
        subject = build(name, args.device)
        subject.update_prompts = args.update_prompts or subject.update_prompts
        params = sum(p.numel() for p in subject.model.parameters())
        print(f"{name}: {params / 1e6:.1f}M parameters", flush=True)
        result = {"parameters": params}

        def report(text: str) -> None:
            print(f"  {text} ({time.perf_counter() - started:.0f} s)", flush=True)

        result["generation"] = measure_generation(subject, args.batch, args.repeats)
        report(f"generation: gen_vs_limit {result['generation']['gen_vs_limit']:.2f}")
        result["tree_vs_chain"] = []
        for p in prompt_counts:
            result["tree_vs_chain"].append(measure_tree_vs_chain(subject, p, args.batch, args.repeats))
            report(f"{p} prompts: tree_vs_chain {result['tree_vs_chain'][-1]['tree_vs_chain']:.2f}")
        result["update"] = []
        for depth in (1, 2):
            result["update"].append(measure_update(subject, depth, args.batch, args.repeats))
            report(f"update L={depth}: packed_speedup {result['update'][-1]['packed_speedup']:.2f}")
        payload["models"][name] = result
        if name == names[0]:  # the headline ratios: the first model, train.py's step where it applies
            payload.update(
                gen_vs_limit=result["generation"]["gen_vs_limit"],
                tree_vs_chain=result["tree_vs_chain"][0]["tree_vs_chain"],
                packed_speedup=result["update"][0]["packed_speedup"],
            )
        payload["wall_seconds"] = time.perf_counter() - started
        write_json(Path(args.out) / "throughput.json", payload)  # after every model: a cut run keeps the rest
        table += table_rows(name, result)
        del subject
    print(markdown_table(["model", "measure", "value", "against", "ratio"], table))
    print(f"{payload['wall_seconds']:.0f} s; wrote {Path(args.out) / 'throughput.json'}")
    return payload


if __name__ == "__main__":
    main()
