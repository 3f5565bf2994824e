"""Rollout speed of the two backends: the same EPTree forests grown with transformers and with vLLM.

    python -m eval.rollout_backends [--prompts 16] [--repeats 3] [--model DIR] [--out results]

Both backends grow forests of the same shape, EPTree (M, N, L, T) = (4, 2, 1, 2), at most 64 new
tokens per response, temperature 1, entropy forks (the CPU default's settings), for the same
held-out prompts, on the CPU default model: the warm-started policy of `python train.py` (made,
then cached, by `eval.common.warm_started_policy` in runs/experiments/warm-start; `--model DIR`
names another save_pretrained folder). The two forests differ in content (each backend draws its own
samples) but not in shape. For each backend it reports

  tokens/s       generated tokens / wall time of `tree.eptree_batch`, the best and the median of
                 --repeats batches (after one warm-up batch); the two backends take turns in every
                 repeat, so load from other jobs on the machine falls on both, and the best repeat
                 is the one least disturbed by it;
  sync s         seconds per `backend.sync(model)` after the weights changed (median); transformers
                 samples from the trained model itself, so its sync is free;
  prefix cached  share of the prefix tokens (the prompts, and for every fork the prompt plus the
                 response up to the fork) whose KV states were not computed again: taken from
                 vLLM's prefix cache, or by HFBackend from the states it kept of the search's
                 earlier samples (`reusing_prefixes`, on for a model on a CPU);
  start s        seconds to build the backend (vLLM: engine start and first weight load).

Writes results/rollout_backends.json and prints a Markdown table. vLLM runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), as in training; the vLLM columns need vLLM installed
(requirements-cpu-vllm.txt on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

import policy
import rewards
import tasks
import tree
import treerl
from eval.common import machine, markdown_table, warm_started_policy, write_json
from hf_backend import HFBackend

SHAPE = dict(M=4, N=2, L=1, T=2)
MAX_NEW_TOKENS = 64


def grow_forests(backend, prompts, answer_start, seed: int) -> tuple[int, float]:
    """One batch of EPTree forests; returns (generated tokens, seconds)."""
    torch.manual_seed(seed)

    def sample_fn(prefixes, n, budgets):
        return backend.sample(prefixes, n, budgets or MAX_NEW_TOKENS, 1.0, 1.0)

    started = time.perf_counter()
    with getattr(backend, "reusing_prefixes", contextlib.nullcontext)():  # as treerl.rollout does
        forests = tree.eptree_batch(
            prompts,
            sample_fn,
            **SHAPE,
            fork_score="entropy",
            skip_last=4,
            answer_start=answer_start,
            seed=seed,
            max_response_tokens=MAX_NEW_TOKENS,
        )
    seconds = time.perf_counter() - started
    return sum(tree.generated_tokens(root) for root in forests), seconds


def nudge(model, scale: float = 1e-4) -> None:
    """A small change of every weight, standing in for an optimizer step before a sync."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def measure(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = args.model or str(warm_started_policy(args.runs_dir))
    model, tokenizer = policy.load_policy(model_dir, policy.PolicyConfig(device="cpu"), torch.device("cpu"))
    model.eval()
    task = tasks.build_task(tasks.TaskConfig(), tokenizer)
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval[: args.prompts]]
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
            tokens, seconds = grow_forests(backend, prompts, answer_start, seed=repeat)
            nudge(model)
            synced = time.perf_counter()
            backend.sync(model)
            if repeat:
                timings[name]["tokens"].append(tokens)
                timings[name]["seconds"].append(seconds)
                timings[name]["sync"].append(time.perf_counter() - synced)
            print(f"repeat {repeat} {name}: {tokens} tokens in {seconds:.2f} s", flush=True)

    results = {}
    for name, t in timings.items():
        rates = [n / s for n, s in zip(t["tokens"], t["seconds"])]
        results[name] = {
            "tokens_per_second": max(rates),
            "tokens_per_second_median": statistics.median(rates),
            "tokens_per_second_each": rates,
            "generated_tokens_per_batch": statistics.median(t["tokens"]),
            "forest_seconds": statistics.median(t["seconds"]),
            "sync_seconds": statistics.median(t["sync"]),
            "start_seconds": start_seconds[name],
            "prefix_cached_share": backends[name].stats["cached_prompt_tokens"]
            / max(backends[name].stats["prompt_tokens"], 1),
            "fallback_syncs": backends[name].stats["fallback_syncs"] if name == "vllm" else 0,
        }
    if "vllm" in backends:
        backends["vllm"].close()
    return {
        "machine": machine(),
        "model": model_dir,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompts),
        "shape": {**SHAPE, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
        "leaves_per_prompt": SHAPE["M"] * (1 + SHAPE["L"] * SHAPE["N"] * SHAPE["T"]),
        "repeats": args.repeats,
        "backends": results,
    }


def table(payload: dict) -> str:
    rows = []
    for name, r in payload["backends"].items():
        rows.append(
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
        )
    return markdown_table(
        [
            "backend",
            "tokens/s (best)",
            "tokens/s (median)",
            "tokens per batch",
            "forest s (median)",
            "sync ms",
            "prefix tokens cached",
            "start s",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch (train.py's prompts_per_step)")
    parser.add_argument("--repeats", type=int, default=3, help="measured batches per backend, after one warm-up")
    parser.add_argument(
        "--model", default="", help="save_pretrained folder of the policy (default: the CPU default's warm start)"
    )
    parser.add_argument("--runs_dir", default="runs/experiments", help="where the warm start is cached")
    parser.add_argument("--skip_vllm", action="store_true", help="transformers only (no vLLM installed)")
    parser.add_argument("--out", default="results", help="folder for rollout_backends.json")
    args = parser.parse_args(argv)
    payload = measure(args)
    write_json(Path(args.out) / "rollout_backends.json", payload)
    print(
        f"\n{payload['prompts']} prompts x {payload['leaves_per_prompt']} leaves, EPTree {payload['shape']}; "
        f"{payload['parameters'] / 1e6:.2f}M-parameter policy; {payload['machine']}"
    )
    print(table(payload))
    return payload


if __name__ == "__main__":
    main()
