"""EPTree search and TreeRL's process rewards (Hou et al., ACL 2025, arXiv 2506.11902).

This module is the part of the paper that no other RL library has, and it knows nothing about
models: the search is driven by a sampling callback, and rewards come in as numbers on the leaves.

The tree
--------
A `Node` is one *segment* of tokens. The root holds the prompt; every other node holds the tokens
generated between two forks; every leaf ends one complete response, so the response of a leaf is
the concatenation of the segments on its path below the root::

    root: "Compute 4+7-2.\\n"                          V(root) = 3/5
     ├── "4+7=11\\n"                                    V = 2/3
     │    ├── "11-2=9\\nAnswer: 9"        reward 1
     │    └── "11-2=8\\nAnswer: 8"        reward 0     <- forked at the most uncertain token
     │         (the fork re-samples "9"/"8": the prefix ends just before it)
     └── ...

EPTree (Section 3.1, Algorithm 1)
---------------------------------
1. Sample M complete responses from the prompt: M trees, each one chain.
2. Repeat L times: in every tree, pick the N tokens with the highest fork score and sample T
   continuations from the prefix that ends just before each chosen token. Algorithm 1 scores a
   token by H(y_t) = -log pi(y_t | x, y_<t), the negative log-probability of the token that was
   sampled (the paper calls it entropy; the release computes the same): `fork_score="nll"`. The chosen token's segment is split there, so the old tail and the T
   new branches become siblings.
A forest of M trees thus has M * (1 + L * N * T) leaves when every tree has N places to fork.

Process rewards (Section 3.2)
-----------------------------
With r(l) in {0, 1} the verifier's verdict on leaf l and L(s) the leaves under segment s:

    V(s)  = mean of r(l) over l in L(s)                       value of a segment
    GA(s) = V(s) - V(root)                                     Eq. 2, global advantage
    LA(s) = V(s) - V(parent(s))                                Eq. 3, local advantage
    R(s)  = (GA(s) + LA(s)) / sqrt(|L(s)|)                     Eq. 4 with the re-weighting

Every token of s is trained with advantage R(s). The 1/sqrt(|L(s)|) factor keeps a prefix shared
by many leaves (and so repeated in many training sequences) from dominating the gradient.

Where the official release (THUDM/TreeRL) computes something else, the paper's equations are the
default here and the release is an option (README, "The paper, mapped to the code", lists them
all): its process rewards (leave-one-out rewards, the square root over kept leaves, filled-in
local advantages) and fork exclusions live in release.py; -1 on every token of a response that
never ended is `to_sequences(truncated_penalty=-1.0)`, RLOO with a clamp for ChainRL
`outcome_advantages("rloo", clamp=True)`.
The fork score of both is the sampled token's NLL; `"entropy"` (of the full next-token
distribution) is an extension offered here, `"random"` the paper's ablation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # nodes are compared and hashed by identity: they are dict keys below
class Node:
    """One segment of a search tree: the prompt (root) or the tokens between two forks.

    `logprobs[i]` is the sampler's log-probability of `tokens[i]` and `entropies[i]` the entropy of
    the sampler's distribution at that position. Leaves carry the verifier's `reward` and whether
    the response ended with the end-of-sequence token (`finished`; the EOS token is then the last
    token of the leaf's segment).
    """

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)
    children: list[Node] = field(default_factory=list, repr=False)
    reward: float | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self.tokens = list(self.tokens)
        # A root (the prompt) has no log-probs; a generated segment has one per token.
        self.logprobs = list(self.logprobs) or [0.0] * len(self.tokens)
        self.entropies = list(self.entropies) or [0.0] * len(self.tokens)
        if not len(self.tokens) == len(self.logprobs) == len(self.entropies):
            raise ValueError(
                f"a segment needs one log-prob and one entropy per token: got {len(self.tokens)} "
                f"tokens, {len(self.logprobs)} log-probs, {len(self.entropies)} entropies"
            )

    def add(
        self,
        tokens: Sequence[int],
        logprobs: Sequence[float] = (),
        entropies: Sequence[float] = (),
        finished: bool = False,
        *,
        scores: Sequence[float] = (),
    ) -> Node:
        """Append a child segment and return it. `scores` is another name of `entropies` (the fork
        scores of `fork_score="entropy"`), part of this method's documented interface."""
        child = Node(list(tokens), list(logprobs), list(entropies or scores), parent=self, finished=finished)
        self.children.append(child)
        return child

    def split(self, i: int) -> Node:
        """Fork point at token i: keep tokens[:i] here, move tokens[i:] (and the children) into a
        new child, and return that child. New branches from the same prefix become its siblings."""
        if not 0 < i < len(self.tokens):
            raise ValueError(f"can only split strictly inside a segment of {len(self.tokens)} tokens, got {i}")
        tail = Node(
            self.tokens[i:],
            self.logprobs[i:],
            self.entropies[i:],
            parent=self,
            reward=self.reward,
            finished=self.finished,
        )
        tail.children = self.children
        for child in tail.children:
            child.parent = tail
        self.tokens, self.logprobs, self.entropies = self.tokens[:i], self.logprobs[:i], self.entropies[:i]
        self.children, self.reward, self.finished = [tail], None, False
        return tail

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        kind = f"leaf reward={self.reward}" if self.is_leaf else f"{len(self.children)} children"
        return f"Node({len(self.tokens)} tokens, {kind})"


def walk(node: Node) -> Iterator[Node]:
    """Every node of the subtree, parents before children (depth-first)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def leaves(node: Node) -> list[Node]:
    """The leaves under `node`, in depth-first order: one per complete response."""
    return [n for n in walk(node) if n.is_leaf]


def ancestors(node: Node) -> list[Node]:
    """The path from the root down to `node`, both included."""
    path = []
    while node is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def path_tokens(node: Node) -> list[int]:
    """All tokens from the start of the prompt to the end of `node`."""
    return [t for n in ancestors(node) for t in n.tokens]


def response_tokens(node: Node) -> list[int]:
    """The generated tokens from the end of the prompt to the end of `node` (the root excluded)."""
    return [t for n in ancestors(node)[1:] for t in n.tokens]


def generated_tokens(root: Node) -> int:
    """Tokens sampled by the whole search (each lives in one segment): the equal-budget measure."""
    return sum(len(n.tokens) for n in walk(root) if n is not root)


def trees(root: Node) -> list[Node]:
    """The tops of the M trees of a forest (the root's children; a split keeps them in place)."""
    return list(root.children)


# --------------------------------------------------------------------------------------------------
# EPTree: entropy-guided tree search (Algorithm 1)
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """A sampled continuation: its tokens (EOS last when `finished`), their log-probs and entropies."""

    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    finished: bool


# sample_fn(prefixes, n, budgets) -> for each prefix, n independent continuations of it, each at
# most budgets[k] tokens long (budgets is None when the search sets no limit: the sampler's own).
SampleFn = Callable[[list[list[int]], int, "list[int] | None"], list[list[Sample]]]
# answer_start(response_tokens) -> index where the final answer starts, or None if it has none.
AnswerStartFn = Callable[[list[int]], "int | None"]

# candidates(top) -> the tokens of one tree where a fork is allowed (`Forkable`, or the release's
# `release.StopWordForks`).
ForkCandidates = Callable[["Node"], "list[Fork]"]


@dataclass(frozen=True)
class Fork:
    """A chosen fork point: token `index` of segment `node`."""

    node: Node
    index: int


@dataclass(frozen=True)
class Forkable:
    """Where EPTree may fork: called on one tree, returns its eligible tokens.

    Never a segment's first token (it was just re-sampled, or it is a place already forked: a split
    always leaves the forked token first in its segment), the EOS token, any token at or after the
    start of the final answer in a response that contains it (`answer_start`, from the task's answer
    markers), or any token within `skip_last` tokens of the end of a response that contains it.
    """

    skip_last: int = 4
    answer_start: AnswerStartFn | None = None

    def __call__(self, top: Node) -> list[Fork]:
        blocked: set[tuple[int, int]] = set()  # (id(node), index) of excluded tokens
        for leaf in leaves(top):
            segments = ancestors(leaf)[1:]  # the whole response, from the end of the prompt
            length = sum(len(s.tokens) for s in segments)
            # First excluded offset in this response: the tail guard (and EOS), then the answer.
            cut = length - max(self.skip_last, 1 if leaf.finished else 0)
            if self.answer_start is not None:
                start = self.answer_start([t for s in segments for t in s.tokens])
                if start is not None:
                    cut = min(cut, start)
            offset = 0
            for s in segments:
                blocked.update((id(s), i) for i in range(max(cut - offset, 0), len(s.tokens)))
                offset += len(s.tokens)
        return [Fork(n, i) for n in walk(top) for i in range(1, len(n.tokens)) if (id(n), i) not in blocked]


# The fork scores, higher first: Algorithm 1's H(y_t) = -log pi(y_t | x, y_<t) of the sampled token
# (the release's too); the entropy of the full next-token distribution there (an extension). The
# third choice, "random", is the paper's ablation.
FORK_SCORES = {
    "nll": lambda fork: -fork.node.logprobs[fork.index],
    "entropy": lambda fork: fork.node.entropies[fork.index],
}


def select_forks(top: Node, n: int, fork_score: str, rng: random.Random, candidates: ForkCandidates) -> list[Fork]:
    """The (at most) n eligible tokens of one tree with the highest fork score (or n random ones)."""
    eligible = candidates(top)
    if fork_score == "random":
        return rng.sample(eligible, min(n, len(eligible)))
    # sorted() is stable, so ties keep depth-first order and the search stays deterministic.
    return sorted(eligible, key=FORK_SCORES[fork_score], reverse=True)[:n]


def _attach(parent: Node, sample: Sample, budget: int | None = None) -> Node:
    """Hang a sampled continuation under `parent`, cut to `budget` tokens if it is longer (a
    response that is cut never reached EOS, so it is not finished)."""
    if budget is not None and len(sample.tokens) > budget:
        return parent.add(sample.tokens[:budget], sample.logprobs[:budget], sample.entropies[:budget])
    return parent.add(sample.tokens, sample.logprobs, sample.entropies, finished=sample.finished)


def eptree_batch(
    prompts: Sequence[Sequence[int]],
    sample_fn: SampleFn,
    M: int,
    N: int,
    L: int,
    T: int,
    fork_score: str = "nll",
    candidates: ForkCandidates = Forkable(),
    seed: int = 0,
    max_response_tokens: int | None = None,
    full_length_branches: bool = False,
) -> list[Node]:
    """Grow an EPTree forest for every prompt and return their roots (Algorithm 1).

    M chains per prompt first, then L rounds of N forks per tree with T continuations per fork.
    Each step sends the prefixes of *all* forests to `sample_fn` together, so a batched sampler
    stays busy (one call for the chains, then one call per round). L = 0 gives M independent
    chains: ChainRL's rollout. Rewards are not assigned here: set `leaf.reward` on `leaves(root)`.
    `candidates` says where a tree may fork (`Forkable`: not in the answer, not at the very end).

    `max_response_tokens` caps every complete response, the part before a fork included: a branch
    may fill what that budget leaves below its fork; with `full_length_branches` (the release) it
    may add `max_response_tokens` tokens of its own, so a forked response can be longer than a
    chain. The settings are checked once, by `treerl.TreeConfig.validate`."""
    rng = random.Random(seed)
    roots = [Node(list(p)) for p in prompts]

    # Step 1: M complete responses from each prompt, in one call.
    chain_budgets = None if max_response_tokens is None else [max_response_tokens] * len(roots)
    for root, group in zip(roots, sample_fn([root.tokens for root in roots], M, chain_budgets)):
        for sample in group:
            _attach(root, sample, max_response_tokens)
    if N == 0 or T == 0:
        return roots

    # Step 2: L rounds; in each, the top-N tokens of every tree (chosen on the tree as it stands at
    # the start of the round) are forked T times.
    for _ in range(L):
        forks = [
            fork for root in roots for top in trees(root) for fork in select_forks(top, N, fork_score, rng, candidates)
        ]
        if not forks:
            break
        # The prefix ends strictly before the forked token, which the sampler draws again.
        prefixes = [path_tokens(f.node.parent) + f.node.tokens[: f.index] for f in forks]
        # A branch may fill what the response budget leaves below its fork point (at least the
        # forked token itself: fork candidates lie inside responses that fit the budget).
        budgets = None
        if max_response_tokens is not None and full_length_branches:
            budgets = [max_response_tokens] * len(forks)
        elif max_response_tokens is not None:
            budgets = [
                max_response_tokens - (len(prefix) - len(ancestors(f.node)[0].tokens))
                for f, prefix in zip(forks, prefixes)
            ]
        continuations = sample_fn(prefixes, T, budgets)
        # Split each segment at its fork points from the last to the first, so earlier indices
        # stay valid; the branches forked at index i become siblings of the tail split off there.
        order = sorted(range(len(forks)), key=lambda k: (id(forks[k].node), -forks[k].index))
        for k in order:
            node = forks[k].node
            node.split(forks[k].index)
            for sample in continuations[k]:
                _attach(node, sample, None if budgets is None else budgets[k])
    return roots


# --------------------------------------------------------------------------------------------------
# Process rewards (Section 3.2, Eqs. 2-4)
# --------------------------------------------------------------------------------------------------


def subtree_sums(root: Node, leaf_value: Callable[[Node], float]) -> dict[Node, float]:
    """The sum of leaf_value(l) over the leaves l under every node (a leaf: its own value)."""
    sums: dict[Node, float] = {}
    for node in reversed(list(walk(root))):  # children before parents
        sums[node] = leaf_value(node) if node.is_leaf else sum(sums[c] for c in node.children)
    return sums


def leaf_counts(root: Node) -> dict[Node, int]:
    """|L(s)|: the number of leaves under every node (a leaf counts itself)."""
    return subtree_sums(root, lambda leaf: 1)


def values(root: Node) -> dict[Node, float]:
    """V(s): mean reward of the leaves under every node, the root (all M trees) included."""
    if any(leaf.reward is None for leaf in leaves(root)):
        raise ValueError("a leaf has no reward: score every leaf before values()")
    sums, counts = subtree_sums(root, lambda leaf: float(leaf.reward)), leaf_counts(root)
    return {node: sums[node] / counts[node] for node in sums}


def process_rewards(
    root: Node, reweight: str = "sqrt", use_global: bool = True, use_local: bool = True
) -> dict[Node, float]:
    """R(s) for every non-root node: GA + LA (Eqs. 2-4), over sqrt(|L(s)|) when reweight="sqrt"
    ("none": plain GA + LA). `use_global` / `use_local` switch the two terms off one at a time,
    for the paper's ablations. The release's variants are `release.process_rewards`."""
    v, counts = values(root), leaf_counts(root)
    rewards: dict[Node, float] = {}
    for node in walk(root):
        if node is root:
            continue
        global_advantage = v[node] - v[root]  # Eq. 2
        local_advantage = v[node] - v[node.parent]  # Eq. 3
        r = use_global * global_advantage + use_local * local_advantage  # Eq. 4
        rewards[node] = r / math.sqrt(counts[node]) if reweight == "sqrt" else r
    return rewards


ADVANTAGE_KINDS = ("grpo", "drgrpo", "rloo")


def outcome_advantages(
    rewards: Sequence[float], kind: str = "grpo", eps: float = 1e-6, clamp: bool = False
) -> list[float]:
    """ChainRL's outcome advantages for one group of responses to the same prompt.

    grpo:   (r - mean) / (std + eps)           (Shao et al., 2024; the sample std, n - 1, as in
                                                DeepSeek's and TRL's GRPO)
    drgrpo: r - mean                            (Dr. GRPO, Liu et al., 2025: no std division)
    rloo:   r - mean of the *other* responses   (REINFORCE leave-one-out, Ahmadian et al., 2024)
    `clamp` (the release's ChainRL) raises negative advantages to at least -max(A).
    """
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    if kind == "grpo":
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
        advantages = [(r - mean) / (std + eps) for r in rewards]
    elif kind == "drgrpo":
        advantages = [r - mean for r in rewards]
    elif kind == "rloo":
        advantages = [r - (mean * n - r) / (n - 1) for r in rewards] if n > 1 else [0.0]
    else:
        raise ValueError(f"advantage kind must be one of {ADVANTAGE_KINDS}, got {kind!r}")
    if clamp:
        floor = -max(advantages)
        advantages = [max(a, floor) for a in advantages]
    return advantages


def chain_advantages(root: Node, kind: str = "grpo", clamp: bool = False) -> dict[Node, float]:
    """Outcome advantages as a per-segment map, for a forest of unforked chains (L = 0)."""
    chains = trees(root)
    if any(not c.is_leaf for c in chains):
        raise ValueError("chain_advantages needs unforked chains (L = 0); use process_rewards on trees")
    for c in chains:
        if c.reward is None:
            raise ValueError(f"leaf {c!r} has no reward: score every leaf first")
    return dict(zip(chains, outcome_advantages([c.reward for c in chains], kind, clamp=clamp)))


# --------------------------------------------------------------------------------------------------
# From a tree to training sequences
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainSequence:
    """One leaf path as a training example: every token carries its segment's advantage (or its own,
    under a per-token credit: `to_sequences`)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # the sampler's log-probs of the response tokens
    advantages: list[float]  # one per response token
    reward: float  # the leaf's outcome reward
    finished: bool
    leaf: Node = field(repr=False)


def pick_leaves(root: Node, keep: int | None = None, rng: random.Random | None = None) -> list[Node]:
    """The leaves to train on: all of them, or a random K (`keep`, the release trains 16 of 30)
    with at least one leaf of positive reward when there is one, in depth-first order."""
    chosen = leaves(root)
    if keep is not None and keep < len(chosen):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        rng = rng or random.Random(0)
        picked = rng.sample(chosen, keep)
        correct = [leaf for leaf in chosen if (leaf.reward or 0) > 0]
        if correct and not any(leaf in correct for leaf in picked):
            picked[rng.randrange(keep)] = rng.choice(correct)
        chosen = [leaf for leaf in chosen if leaf in picked]  # keep depth-first order
    return chosen


def to_sequences(
    root: Node,
    advantages: dict[Node, float | Sequence[float]],
    keep: int | None = None,
    rng: random.Random | None = None,
    truncated_penalty: float | None = None,
    chosen: Sequence[Node] | None = None,
) -> list[TrainSequence]:
    """Flatten a forest into one training sequence per leaf.

    `advantages` maps every non-root segment to the advantage of its tokens: one number, which
    every token of the segment carries (process_rewards, chain_advantages), or a list of one number
    per token of the segment, a per-token credit, which reaches the loss as it is. The leaves are
    `chosen` (pick_leaves), or else `pick_leaves(root, keep, rng)`. `truncated_penalty` (the
    release uses -1.0) replaces the advantage of every token of a response that never ended.
    """
    if chosen is None:
        chosen = pick_leaves(root, keep, rng)
    sequences = []
    for leaf in chosen:
        segments = ancestors(leaf)[1:]
        if truncated_penalty is not None and not leaf.finished:
            token_advantages = [truncated_penalty] * sum(len(s.tokens) for s in segments)
        else:
            token_advantages = [a for s in segments for a in token_credit(s, advantages[s])]
        sequences.append(
            TrainSequence(
                prompt_ids=list(root.tokens),
                response_ids=[t for s in segments for t in s.tokens],
                logprobs=[lp for s in segments for lp in s.logprobs],
                advantages=token_advantages,
                reward=float(leaf.reward if leaf.reward is not None else 0.0),
                finished=leaf.finished,
                leaf=leaf,
            )
        )
    return sequences


def token_credit(segment: Node, advantage: float | Sequence[float]) -> list[float]:
    """The advantages of a segment's tokens: one value on every token (R(s), Eq. 4), or the
    segment's per-token credit, one value per token."""
    if not isinstance(advantage, Sequence):
        return [advantage] * len(segment.tokens)
    if len(advantage) != len(segment.tokens):
        raise ValueError(
            f"a per-token advantage needs one value per token: got {len(advantage)} for a segment of "
            f"{len(segment.tokens)} tokens"
        )
    return list(advantage)
