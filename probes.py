"""Instruments of the fair comparison (eval/compare_rl.py), not part of TreeRL: oracle and placebo
blame (`--blame`), which move a wrong leaf's advantage onto one line of it, and the norms of the
update's policy-gradient and KL parts (`--log_grad_parts`). treerl.py calls them where its settings
ask for them; a first reading skips this file.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Protocol

import torch

import tree

# --------------------------------------------------------------------------------------------------
# Oracle blame
# --------------------------------------------------------------------------------------------------
# What would perfect credit assignment buy? The arithmetic task knows the first wrong line of a
# wrong response (tasks.arith_step_truth). `--blame oracle` takes each wrong leaf that has one and
# puts its whole advantage mass (its per-token advantages summed) on that line's tokens, 0 on every
# other token; every other leaf (right, or cut off before anything went wrong) keeps its advantages.
# The mass is the method's own, so the comparison with that method is one of *where* the push goes,
# not how hard. `--blame placebo` puts the same mass on a line of the same leaf drawn at random: it
# tells "the right place" from "concentrated in one place". Both apply to chains or forests alike.


class StepTruthFn(Protocol):
    """Per token of a response: the line it belongs to (`lines`), and the first wrong line
    (`first_wrong_line`, None if nothing is wrong yet); tasks.Task.step_truth, its prompt's text
    and the decoder bound."""

    def __call__(self, prompt_ids: list[int], response_ids: list[int], finished: bool): ...


def relocate_blame(
    sequences: list[tree.TrainSequence], step_truth: StepTruthFn, kind: str, rng: random.Random
) -> tuple[list[tree.TrainSequence], int]:
    """The sequences with the advantage mass of every wrong leaf that has a wrong line moved onto
    its first wrong line (kind "oracle") or one of its lines drawn with `rng` ("placebo"); and how
    many leaves were moved."""
    moved, count = [], 0
    for seq in sequences:
        truth = step_truth(seq.prompt_ids, seq.response_ids, seq.finished) if seq.reward == 0 else None
        if truth is None or truth.first_wrong_line is None:
            moved.append(seq)
            continue
        target = truth.first_wrong_line if kind == "oracle" else rng.choice(sorted(set(truth.lines)))
        share = sum(seq.advantages) / truth.lines.count(target)
        advantages = [share if line == target else 0.0 for line in truth.lines]
        moved.append(dataclasses.replace(seq, advantages=advantages))
        count += 1
    return moved, count


# --------------------------------------------------------------------------------------------------
# The gradient's two parts
# --------------------------------------------------------------------------------------------------


def add_kl_gradient(kl_grad: list[torch.Tensor] | None, model, term: torch.Tensor) -> list[torch.Tensor]:
    """`kl_grad` (None at first) plus the gradient of `term`, a micro-batch's KL term as policy_loss
    adds it; the graph is kept for the loss's own backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return grads if kl_grad is None else [a + g for a, g in zip(kl_grad, grads)]


def gradient_parts(model, kl_grad: list[torch.Tensor] | None) -> dict[str, float]:
    """Norms of the accumulated gradient's two parts, before clipping: the policy gradient's
    (pg_grad_norm) and the KL term's (kl_grad_norm, 0 without a KL)."""
    total = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters() if p.requires_grad]
    kl_grad = kl_grad or [torch.zeros_like(g) for g in total]

    def norm(grads):
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    return {"pg_grad_norm": norm([t - k for t, k in zip(total, kl_grad)]), "kl_grad_norm": norm(kl_grad)}
