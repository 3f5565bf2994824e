"""What the authors' released code (THUDM/TreeRL) computes where it differs from the paper.

Skip this file on a first reading: the paper's process rewards (Eqs. 2-4) are `tree.process_rewards`
and its fork rule is `tree.Forkable`; `configs/release.yaml` switches to what is here, one flag for
each difference (README, "The paper, mapped to the code", lists them all):

- `--leave_one_out`: each leaf's reward is centred on the mean of the *other* leaves of its forest
  before the values, r'_l = r_l - (S - r_l) / (n - 1) with S the sum of all n rewards, so that
  V(root) = 0;
- `--reweight release`: the square root is taken over the leaves *kept for training* (sel(s)) and
  applied to each value separately, W(s) = V(s) / sqrt(sel(s)), GA = W(s) - W(root),
  LA = W(s) - W(parent), not to their sum (the release writes R = LA + W(s): the same, since its
  centred V(root) is 0); a segment with no kept leaf below gets 0;
- `--fill_in_paths`: a local advantage with |LA| < 1e-8 is replaced by the (filled) local
  advantage of the segment above it, except directly under the prompt;
- `--fork_exclusions release` (`StopWordForks`): in each segment, no fork after the first token
  whose text contains "answer" or "conclusion"; EOS and the last tokens of a response stay
  eligible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tree
from tree import Fork, Node


def leave_one_out_values(root: Node) -> dict[Node, float]:
    """V(s) of leave-one-out centred leaf rewards (`--leave_one_out`)."""
    found = tree.leaves(root)
    if len(found) < 2 or any(leaf.reward is None for leaf in found):
        return tree.values(root)  # nothing to centre on (or unscored leaves: values() says so)
    n, total = len(found), sum(leaf.reward for leaf in found)
    sums = tree.subtree_sums(root, lambda leaf: leaf.reward - (total - leaf.reward) / (n - 1))
    counts = tree.leaf_counts(root)
    return {node: sums[node] / counts[node] for node in sums}


def kept_counts(root: Node, kept: Sequence[Node]) -> dict[Node, int]:
    """sel(s): how many of the `kept` leaves (those trained on) are under every node."""
    kept = set(kept)
    return tree.subtree_sums(root, lambda leaf: int(leaf in kept))


def process_rewards(
    root: Node,
    kept: Sequence[Node] | None = None,
    leave_one_out: bool = False,
    reweight: str = "sqrt",
    fill_in_paths: bool = False,
    use_global: bool = True,
    use_local: bool = True,
) -> dict[Node, float]:
    """R(s) for every non-root node with the release's variants switched on one at a time (the
    module docstring); with all of them off, `tree.process_rewards`. `kept`: the leaves trained
    on (all when None), for reweight="release"."""
    v = leave_one_out_values(root) if leave_one_out else tree.values(root)
    counts = tree.leaf_counts(root)
    if reweight == "release":
        sel = kept_counts(root, tree.leaves(root) if kept is None else kept)
        v = {node: v[node] / math.sqrt(sel[node]) if sel[node] else 0.0 for node in v}
    rewards: dict[Node, float] = {}
    local: dict[Node, float] = {}
    for node in tree.walk(root):  # parents before children
        if node is root:
            continue
        local[node] = v[node] - v[node.parent]
        if fill_in_paths and abs(local[node]) < 1e-8 and node.parent is not root:
            local[node] = local[node.parent]
        r = use_global * (v[node] - v[root]) + use_local * local[node]
        if reweight == "sqrt":
            r /= math.sqrt(counts[node])
        elif reweight == "release" and not sel[node]:
            r = 0.0
        rewards[node] = r
    return rewards


@dataclass(frozen=True)
class StopWordForks:
    """The release's fork rule (`--fork_exclusions release`): any token but a segment's first, up to
    the first token of the segment that `stop_word_at` finds (a word such as "answer"); nothing
    after it. EOS and the last tokens of a response stay eligible."""

    stop_word_at: Callable[[list[int]], int | None] | None = None

    def __call__(self, top: Node) -> list[Fork]:
        forks = []
        for node in tree.walk(top):
            stop = self.stop_word_at(node.tokens) if self.stop_word_at is not None else None
            end = len(node.tokens) if stop is None else min(stop + 1, len(node.tokens))
            forks += [Fork(node, i) for i in range(1, end)]
        return forks


def stop_word_fn(
    decode: Callable[[list[int]], str], words: Sequence[str] = ("answer", "conclusion")
) -> Callable[[list[int]], int | None]:
    """The index of the first token of a segment whose own text contains one of `words` (any
    case), for `StopWordForks`. (With a character tokenizer no single token contains a word, so
    nothing is excluded.)"""

    def stop_word_at(tokens: list[int]) -> int | None:
        for index, token in enumerate(tokens):
            text = decode([token]).lower()
            if any(word in text for word in words):
                return index
        return None

    return stop_word_at
