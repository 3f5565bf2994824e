"""Where a TreeRL step spends its time, and how close each phase is to what this machine can do.

    python -m eval.throughput [--models default,30m] [--batch 256] [--repeats 3]

For each model (the CPU default architecture, 0.9M parameters, and a 30M-parameter one; random
weights, so every response runs to the length limit and runs are comparable) it measures:

  generation   tokens/s of the transformers backend (`treerl.HFBackend`: its decode loop with
               per-prefix budgets, rows leaving the batch, per-token log-prob and entropy) against
               the *limit*: a bare batched decode loop in plain torch on the same model, batch and
               length, with the same in-place KV cache and nothing else in it.
               gen_vs_limit = backend / limit.
  tree vs chain tokens/s of an EPTree forest (M=4, N=2, L=1, T=2) against independent chains of
               about the same total tokens. tree_vs_chain = forest / chains. The forest's fork
               rounds re-read each prefix ("prefill"): its share of the fork round's time says
               whether re-using the parents' KV cache would pay.
  update       training tokens/s (forward + backward) over the leaf sequences of that forest, flat
               (one row per leaf) and tree-packed (`--pack_tree`: one row of unique tokens per
               forest), counted in *leaf-path* tokens, the work the loss stands for.
               packed_speedup = packed / flat; also for a deeper forest (L = 2).

The phase shares of a whole training step (rollout, verification, update, sync) are in every
train.py run's metrics.jsonl (time_* keys); README quotes them. Writes results/throughput.json
and prints a table. Timings are medians over --repeats after one warm-up run.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import packing
import train
import tree
import treerl
from eval.common import machine, markdown_table, write_json
from treerl import UpdateConfig

MODELS = {  # name -> (hidden size, layers, heads)
    "default": (128, 4, 4),
    "30m": (512, 9, 8),
}
PROMPT_TOKENS = 16
RESPONSE_TOKENS = 64


def build(name: str):
    hidden, layers, heads = MODELS[name]
    cfg = train.parse_config(["--hidden_size", str(hidden), "--num_layers", str(layers),
                              "--num_heads", str(heads)]).run
    tokenizer = train.build_char_tokenizer()
    torch.manual_seed(0)
    model = train.build_tiny_model(cfg, tokenizer).eval()
    # Random weights never stop early if EOS is an id the model cannot emit.
    never = len(tokenizer)
    return model, tokenizer, never


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of fn() over `repeats` runs after one warm-up; and the last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


@torch.no_grad()
def bare_decode(model, batch: torch.Tensor, steps: int) -> int:
    """The limit: prefill, then one forward per token with a KV cache written in place, and
    multinomial sampling; no padding, masks, per-token statistics or stopping."""
    cache = treerl.preallocated_kv_cache(model, capacity=batch.shape[1] + steps)
    out = model(input_ids=batch, past_key_values=cache, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    for _ in range(steps):
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return batch.shape[0] * steps


def measure_generation(model, tokenizer, never, batch: int, repeats: int) -> dict:
    rows = prompts(batch, len(tokenizer))
    limit_s, tokens = timed(lambda: bare_decode(model, torch.tensor(rows), RESPONSE_TOKENS), repeats)
    backend = treerl.HFBackend(model, never, tokenizer.pad_token_id, batch_size=batch)
    backend_s, groups = timed(lambda: backend.sample(rows, 1, RESPONSE_TOKENS), repeats)
    backend_tokens = sum(len(s.tokens) for g in groups for s in g)
    return {"batch": batch, "limit_tokens_per_s": tokens / limit_s,
            "backend_tokens_per_s": backend_tokens / backend_s,
            "gen_vs_limit": (backend_tokens / backend_s) / (tokens / limit_s)}


def grow(backend, rows, M, N, L, T, seed=0) -> tuple[list[tree.Node], dict[str, float]]:
    """EPTree forests for `rows`, timing the initial chains and the fork rounds apart, and the
    fork rounds' prefill (the same prefixes with one new token) to see what re-reading costs."""
    phase = {"chains": 0.0, "forks": 0.0, "prefill": 0.0}
    calls = []

    def sample_fn(prefixes, n, budgets):
        started = time.perf_counter()
        out = backend.sample(prefixes, n, budgets)
        spent = time.perf_counter() - started
        if not calls:
            phase["chains"] += spent
        else:
            phase["forks"] += spent
            started = time.perf_counter()
            backend.sample(prefixes, n, 1)
            phase["prefill"] += time.perf_counter() - started
        calls.append(len(prefixes))
        return out

    torch.manual_seed(seed)
    forests = tree.eptree_batch(rows, sample_fn, M, N, L, T, seed=seed, max_response_tokens=RESPONSE_TOKENS)
    return forests, phase


def measure_tree_vs_chain(model, tokenizer, never, prompts_per_step: int, repeats: int) -> dict:
    rows = prompts(prompts_per_step, len(tokenizer), seed=1)
    backend = treerl.HFBackend(model, never, tokenizer.pad_token_id, batch_size=256)
    forest_times, phases = [], []
    for seed in range(repeats + 1):
        started = time.perf_counter()
        forests, phase = grow(backend, rows, 4, 2, 1, 2, seed)
        forest_times.append(time.perf_counter() - started - phase["prefill"])
        phases.append(phase)
    forest_tokens = sum(tree.generated_tokens(root) for root in forests)
    chains = max(1, round(forest_tokens / (len(rows) * RESPONSE_TOKENS)))
    chain_s, groups = timed(lambda: backend.sample(rows, chains, RESPONSE_TOKENS), repeats)
    chain_tokens = sum(len(s.tokens) for g in groups for s in g)
    forest_s = statistics.median(forest_times[1:])
    forks_s = statistics.median(p["forks"] for p in phases[1:])
    prefill_s = statistics.median(p["prefill"] for p in phases[1:])
    return {"prompts": len(rows), "forest_tokens": forest_tokens, "forest_tokens_per_s": forest_tokens / forest_s,
            "chains_per_prompt": chains, "chain_tokens": chain_tokens, "chain_tokens_per_s": chain_tokens / chain_s,
            "tree_vs_chain": (forest_tokens / forest_s) / (chain_tokens / chain_s),
            "fork_round_seconds": forks_s, "fork_prefill_seconds": prefill_s,
            "fork_prefill_share": prefill_s / forks_s}


def training_sequences(forests: list[tree.Node], seed: int = 0) -> list[tree.TrainSequence]:
    rng = random.Random(seed)
    sequences = []
    for root in forests:
        for leaf in tree.leaves(root):
            leaf.reward = float(rng.random() < 0.5)
            leaf.finished = True
        sequences += tree.to_sequences(root, tree.process_rewards(root))
    return sequences


def measure_update(model, tokenizer, never, depth: int, repeats: int) -> dict:
    rows = prompts(16, len(tokenizer), seed=2)
    backend = treerl.HFBackend(model, never, tokenizer.pad_token_id, batch_size=256)
    forests, _ = grow(backend, rows, 4, 2, depth, 2)
    sequences = training_sequences(forests)
    leaf_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    result = {"L": depth, "leaves": len(sequences), "leaf_path_tokens": leaf_tokens,
              "unique_over_flat": packing.token_ratio(sequences)}
    for name, pack in (("flat", False), ("packed", True)):
        cfg = UpdateConfig(lr=1e-6, pack_tree=pack)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # time the work, leave the weights
        seconds, _ = timed(lambda: treerl.update(model, optimizer, None, sequences, cfg, tokenizer.pad_token_id), repeats)
        result[f"{name}_leaf_tokens_per_s"] = leaf_tokens / seconds
        result[f"{name}_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["packed_speedup"] = result["packed_leaf_tokens_per_s"] / result["flat_leaf_tokens_per_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,30m", help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=256, help="generation batch (train.py's gen_batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    started = time.perf_counter()
    results = {}
    for name in names:
        model, tokenizer, never = build(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.1f}M parameters", flush=True)
        results[name] = {
            "parameters": params,
            "generation": measure_generation(model, tokenizer, never, args.batch, args.repeats),
            "tree_vs_chain": measure_tree_vs_chain(model, tokenizer, never, 16, args.repeats),
            "update": [measure_update(model, tokenizer, never, depth, args.repeats) for depth in (1, 2)],
        }
    first = results[names[0]]
    payload = {"command": "python -m eval.throughput " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine(), "prompt_tokens": PROMPT_TOKENS, "response_tokens": RESPONSE_TOKENS,
               "gen_vs_limit": first["generation"]["gen_vs_limit"],
               "tree_vs_chain": first["tree_vs_chain"]["tree_vs_chain"],
               "packed_speedup": first["update"][0]["packed_speedup"],
               "models": results, "wall_seconds": time.perf_counter() - started}
    write_json(Path(args.out) / "throughput.json", payload)
    table = []
    for name, r in results.items():
        g, t = r["generation"], r["tree_vs_chain"]
        table.append([name, "generation (batch %d)" % g["batch"], f"{g['backend_tokens_per_s']:.0f} tok/s",
                      f"{g['limit_tokens_per_s']:.0f} tok/s (bare loop)", f"{g['gen_vs_limit']:.2f}"])
        table.append([name, "EPTree vs chains", f"{t['forest_tokens_per_s']:.0f} tok/s",
                      f"{t['chain_tokens_per_s']:.0f} tok/s (chains)", f"{t['tree_vs_chain']:.2f}"])
        table.append([name, "fork re-prefill", f"{t['fork_prefill_seconds']:.3f} s",
                      f"{t['fork_round_seconds']:.3f} s (fork round)", f"{t['fork_prefill_share']:.2f}"])
        for u in r["update"]:
            table.append([name, f"update, L={u['L']} ({u['leaves']} leaves, unique/flat {u['unique_over_flat']:.2f})",
                          f"{u['packed_leaf_tokens_per_s']:.0f} tok/s (packed)",
                          f"{u['flat_leaf_tokens_per_s']:.0f} tok/s (flat)", f"{u['packed_speedup']:.2f}"])
    print(markdown_table(["model", "measure", "value", "against", "ratio"], table))
    print(f"{payload['wall_seconds']:.0f} s; wrote {Path(args.out) / 'throughput.json'}")
    return payload


if __name__ == "__main__":
    main()
