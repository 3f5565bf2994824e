"""Instruments of the fair comparison (eval/compare_rl.py), not part of the paper's TreeRL: oracle and
placebo blame (`--blame`), which move a wrong leaf's advantage onto one line of it; two variants of
TreeRL's credit that move a forked segment's reward onto its first line (`--fork_credit`); and the
norms of the update's policy-gradient and KL parts (`--log_grad_parts`). treerl.py calls them where
its settings ask for them; a first reading skips this file.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
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
# Fork-line credit: two variants of TreeRL's process rewards
# --------------------------------------------------------------------------------------------------
# Measured on the long-chain task (eval/credit.py), TreeRL spares a wrong response's correct prefix
# but puts most of the downward push on the lines after the slip, not on the slip: every token of a
# segment carries the segment's one reward R(s), and a segment that starts at a fork runs from the
# forked token to the end of the response. Yet what a fork compares is the choice made at the
# forked token: V(s) - V(parent) is the value of re-sampling from there. These variants put that
# difference where the choice was made, on the segment's first line (from the forked token to the
# end of its line), and keep the segment's mass (R(s) x its tokens), as the oracle does:
#   fork_line        all of R(s) on the first line, 0 on the rest of the segment;
#   fork_line_local  only the local part, LA(s) = (V(s) - V(parent)) [/ sqrt(|L(s)|)], on the
#                    first line; the global part, V(s) - V(root), stays on every token.
# A tree's first segment starts at no fork and keeps R(s) on every token.


def first_line_length(tokens: list[int], decode: Callable[[list[int]], str]) -> int:
    """How many of `tokens` make up their first line: up to and including the newline that ends the
    first line with any text on it (a leading newline, e.g. a fork on the newline before a step,
    belongs to the line after it); all of them if no such newline comes."""
    text_seen = False
    for i, token in enumerate(tokens):
        piece = decode([token])
        before, newline, _ = piece.partition("\n")
        text_seen = text_seen or bool(before.strip())
        if newline and text_seen:
            return i + 1
        text_seen = text_seen or bool(piece.strip())
    return len(tokens)


def on_fork_lines(
    root: tree.Node, rewards: dict[tree.Node, float], cfg, decode: Callable[[list[int]], str]
) -> dict[tree.Node, float | list[float]]:
    """`rewards` (tree.process_rewards under `cfg`, a treerl.RolloutConfig) with every forked
    segment's reward moved onto its first line by `cfg.fork_credit`: one number per token there."""
    values, counts = tree.values(root), tree.leaf_counts(root)
    credit: dict[tree.Node, float | list[float]] = dict(rewards)
    for node in tree.walk(root):
        if node is root or node.parent is root or not node.tokens:
            continue  # the forest's root, or a tree's first segment
        scale = 1 / math.sqrt(counts[node]) if cfg.reweight == "sqrt" else 1.0
        local = cfg.use_local * (values[node] - values[node.parent]) * scale
        moved = rewards[node] if cfg.fork_credit == "fork_line" else local
        n, head = len(node.tokens), first_line_length(node.tokens, decode)
        stays = rewards[node] - moved
        credit[node] = [stays + moved * n / head] * head + [stays] * (n - head)
    return credit


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
