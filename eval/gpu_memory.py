"""Peak GPU memory of the two phases of a TreeRL step on a 1.5B-parameter model (random weights).

    python -m eval.gpu_memory [--config configs/qwen2.5-math-1.5b.yaml] [--prompt_tokens 256]

Needs a CUDA GPU, and no network: it builds Qwen2.5-1.5B's architecture (`eval.throughput.QWEN_1_5B`,
151,936-token vocabulary) with random weights in the preset's dtype, and runs at the preset's sizes

  rollout  one `hf_backend.HFBackend` batch of `gen_batch_size` rows, each a prompt of --prompt_tokens
           and `max_new_tokens` sampled tokens (random weights never stop early, so every row runs
           to the limit: the worst case of the preset);
  update   `treerl.update` with the preset's optimizer (AdamW) and micro-batch size, over two
           micro-batches of full-length sequences (prompt + max_new_tokens), with the preset's
           gradient checkpointing.

and reports torch's peak allocated memory for each (what `train.py` logs per step on a GPU as
gpu_peak_rollout_gb / gpu_peak_update_gb). Writes results/gpu_memory.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

import policy
import train
import tree
import treerl
from eval.common import machine, markdown_table, write_json
from eval.throughput import QWEN_1_5B
from hf_backend import HFBackend


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/qwen2.5-math-1.5b.yaml")
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    config = train.parse_config(["--config", args.config])
    run, model_cfg, rollout, update = config.run, config.policy, config.rollout, config.update
    device = torch.device("cuda")
    peak = policy.GpuPeak(device)

    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama with Qwen2's shapes: the two differ only in Qwen2's attention biases (0.1M parameters).
    torch.manual_seed(0)
    with device:  # initialise on the GPU: 1.5B random float32 weights take a while on a CPU
        model = LlamaForCausalLM(LlamaConfig(**QWEN_1_5B, pad_token_id=0)).to(getattr(torch, model_cfg.dtype))
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
    started = time.perf_counter()
    treerl.update(model, optimizer, None, sequences, update, pad_token_id=0, temperature=rollout.temperature)
    torch.cuda.synchronize()
    update_s = time.perf_counter() - started
    update_peak = peak.read()

    print(f"update: peak {update_peak:.1f} GB, {update_s:.0f} s", flush=True)

    started = time.perf_counter()
    backend = HFBackend(model, eos_token_id=vocab, pad_token_id=0, batch_size=run.gen_batch_size)
    groups = backend.sample([prompt() for _ in range(run.gen_batch_size)], 1, rollout.max_new_tokens)
    rollout_tokens = sum(len(s.tokens) for g in groups for s in g)
    rollout_s = time.perf_counter() - started
    rollout_peak = peak.read()

    print(f"rollout: peak {rollout_peak:.1f} GB, {rollout_s:.0f} s", flush=True)

    payload = {
        "command": "python -m eval.gpu_memory " + " ".join(argv),
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
            "generated": rollout_tokens,
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
    print(
        markdown_table(
            ["phase", "shape", "seconds", "peak allocated"],
            [
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
            ],
        )
    )
    return payload


if __name__ == "__main__":
    main()
