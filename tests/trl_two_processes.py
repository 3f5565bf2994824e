"""Run by tests/test_trl_treerl.py under `torchrun --nproc_per_node 2` (two CPU processes, gloo):
TreeRLTrainer when the processes' forests differ in size.

Process 1 is told that every response is all answer (answer_start = 0), so its trees have nothing
to fork at and its search stops after the chains, while process 0 forks for L = 2 rounds. Both must
still make the same sampling calls (generation can be collective), TRL's reward gathering must cope
with unequal leaf counts, and DDP must keep the weights equal. Each process writes what it saw to
<out>/rank<k>.json.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

import policy
import tree
import trl_treerl


def digit_share(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main(out: str) -> None:
    tokenizer = policy.build_char_tokenizer()
    model = policy.build_tiny_model(policy.PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    prompts = [f"Compute {a}+{b}-1.\n" for a in range(1, 9) for b in range(3)]
    args = trl_treerl.TreeRLConfig(
        output_dir=out,
        M=2,
        N=2,
        L=2,
        T=1,
        per_device_train_batch_size=5,
        gradient_accumulation_steps=2,
        max_steps=2,
        max_completion_length=16,
        learning_rate=1e-3,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        mask_zero_signal=False,
    )  # so the rows left out of the loss are exactly the padding
    trainer = trl_treerl.TreeRLTrainer(
        model,
        reward_funcs=digit_share,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    rank = trainer.accelerator.process_index
    if rank == 1:
        trainer._fork_candidates = tree.Forkable(answer_start=lambda ids: 0)  # nothing to fork at here
    calls, padded = [], []
    sample = trainer._sample

    def counting(prefixes, n, fallback):
        calls.append(len(prefixes))
        return sample(prefixes, n, fallback)

    trainer._sample = counting
    step = trainer._generate_and_score_completions

    def recording(inputs):
        output = step(inputs)
        rows = output["completion_mask"].sum(1)
        padded.append(int((rows == 0).sum()))
        return output

    trainer._generate_and_score_completions = recording
    trainer.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = trainer.accelerator.gather(torch.tensor([checksum], dtype=torch.float64)).tolist()
    leaves = [len(trl_treerl.tree.leaves(root)) for root in trainer.last_forests]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "calls": calls,
                "padded_rows": padded,
                "leaves": leaves,
                "checksums": sums,
                "losses": losses,
                "num_processes": trainer.accelerator.num_processes,
            }
        )
    )
    # Leave together, and close the process group before the interpreter exits: a gloo group torn
    # down at exit can abort the process ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
