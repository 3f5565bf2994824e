"""Tree packing: the training forward over a forest's *unique* tokens.

The flat update (`treerl.collate`) turns every leaf of a forest into its own sequence, prompt and
shared prefixes included, so a segment high in the tree is run through the model once per leaf
below it. A forest of M = 4 trees with one round of forking (L = 1, N = T = 2) has 20 leaves, and
its prompt is processed 20 times. Tree packing lays the forest out once, as one row:

    root  "Q"   (prompt)                    row:     Q  a  b  c  d  e
     └── "ab"                               segment: 0  1  1  2  2  3
          ├── "cd"    leaf 1                position: 0  1  2  3  4  3
          └── "e"     leaf 2

and gives the model two things that make the row behave like the two flat sequences "Qabcd" and
"Qabe" at once:

- **position ids** that continue from the end of the parent segment (e sits at position 3, like
  c, because both follow "Qab"), so rotary embeddings see the same positions as in the flat rows;
- a **4D additive attention mask** [1, 1, S, S] with 0 where a query may look and a very large
  negative number elsewhere: every token sees itself, the earlier tokens of its own segment and all
  tokens of its ancestor segments, and nothing else (e does not see c or d). Softmax turns the
  large negative entries into exact zeros, so each token's hidden states, and so its log-prob,
  are those of the flat sequence it belongs to.

A token's log-prob comes from the logits of the token *before* it on its path, which is not
always the previous position of the row: the first token of a segment is predicted at the last
token of its parent (c and e are both predicted at b). `source[i]` records that position.

The loss is the flat loss, regrouped
------------------------------------
The flat loss is a sum over (leaf, response token) pairs of w_l * f(rho, A) (see
`treerl.policy_loss`): w_l = 1 for token aggregation, 1 / |response of l| for sequence aggregation,
A the token's advantage in that leaf's sequence, and f the clipped surrogate

    f(rho, A) = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)).

A shared token has one log-prob, hence one ratio rho, in every leaf that contains it, so its
terms can be added up once. Its advantage, however, need not be the same in every leaf: with
`truncated_penalty` every token of a truncated response carries the penalty, so a shared prefix
may carry R(s) in one leaf and -1 in another. f is not linear in A (the clip it applies depends on
the sign of A), but it *is* linear on each half-line: for A >= 0, f = -A * min(rho, clip(rho)), and
for A <= 0, f = -A * max(rho, clip(rho)). Hence, summing separately over the leaves where A > 0 and
where A < 0,

    sum_l w_l f(rho, A_l) = f(rho, sum_{A_l > 0} w_l A_l) + f(rho, sum_{A_l < 0} w_l A_l)

exactly, for every rho. So each unique token carries two weighted advantage sums (positive and
negative part) and the packed loss applies f to each; the KL term, which does not involve A, is
weighted by sum_l w_l. Leaves not kept for training (`keep_leaves`) contribute nothing, and
segments that lead only to them are left out of the row.

What it costs
-------------
The row holds each token once, so the MLPs and projections do (unique / flat) of the flat work
(`token_ratio`). Attention differs: a row of S unique tokens attends over an S x S mask, where the
flat batch attends within each leaf's own sequence; and a custom mask keeps SDPA off its
flash-attention kernel. Micro-batches are whole forests (see `treerl.update_packed`), so a very
wide forest of long responses is one large row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

import tree

# --------------------------------------------------------------------------------------------------
# Laying out a forest
# --------------------------------------------------------------------------------------------------


@dataclass
class PackedForest:
    """One forest's trained leaves laid out as one row of unique tokens (plain lists).

    Every per-token list is aligned with `input_ids`. Prompt tokens carry zero weight: they are
    context, not trained.
    """

    input_ids: list[int]
    position_ids: list[int]        # length of the path before the token (as in the flat row)
    source: list[int]              # row index of the token whose logits predict this one
    segment: list[int]             # index of the token's segment (0 = the prompt)
    lineage: list[list[int]]       # per segment: itself and its ancestor segments
    weight: list[float]            # sum of w_l over the trained leaves containing the token
    count: list[int]               # how many trained leaves contain the token
    advantage: list[list[float]]   # [sum of w_l * A_l where A_l > 0, same where A_l < 0]
    count_by_sign: list[list[int]] # [leaves where A_l > 0, leaves where A_l < 0]
    sequence_tokens: list[list[int]]  # per training sequence: row index of each response token
    n_tokens: int                  # response tokens of its sequences, flat (token denominator)
    n_sequences: int               # its training sequences (sequence denominator)
    aggregation: str               # "token" or "sequence": what the weights were made for

    def __len__(self) -> int:
        return len(self.input_ids)


def forests_of(sequences: Sequence[tree.TrainSequence]) -> list[list[int]]:
    """Indices of the sequences grouped by the forest (prompt root) their leaf belongs to, in
    order of first appearance."""
    groups: dict[int, list[int]] = {}
    for k, seq in enumerate(sequences):
        if seq.leaf is None:
            raise ValueError("tree packing needs sequences made by tree.to_sequences (each with its "
                             f"leaf); sequence {k} has leaf=None")
        root = tree.ancestors(seq.leaf)[0]
        groups.setdefault(id(root), []).append(k)
    return list(groups.values())


def pack_forest(sequences: Sequence[tree.TrainSequence], aggregation: str = "token") -> PackedForest:
    """Lay out the leaves of `sequences` (all from one forest) as one row of unique tokens, with the
    per-token loss weights of `aggregation` ("token" or "sequence")."""
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be token or sequence; got {aggregation!r}")
    root = tree.ancestors(sequences[0].leaf)[0]
    if any(tree.ancestors(seq.leaf)[0] is not root for seq in sequences):
        raise ValueError("pack_forest takes the sequences of one forest; use pack_sequences for several")
    if not root.tokens:
        raise ValueError("tree packing needs a non-empty prompt: its last token predicts the first response token")

    # 1. The segments on the paths to the trained leaves, parents before children (depth first),
    #    so all of a token's ancestors sit to its left in the row.
    trained = {node for seq in sequences for node in tree.ancestors(seq.leaf)}
    nodes = [node for node in tree.walk(root) if node in trained]
    number = {node: s for s, node in enumerate(nodes)}
    lineage = [[number[a] for a in tree.ancestors(node)] for node in nodes]

    # 2. The row: tokens, their positions, and where each one is predicted from.
    input_ids, position_ids, source, segment = [], [], [], []
    first: dict[tree.Node, int] = {}   # row index of the segment's first token
    end: dict[tree.Node, int] = {}     # row index of the last token on the path to the segment's end
    depth: dict[tree.Node, int] = {}   # number of tokens on that path (the next position id)
    for node in nodes:
        start = 0 if node is root else depth[node.parent]
        first[node] = len(input_ids)
        for k, token in enumerate(node.tokens):
            i = len(input_ids)
            input_ids.append(token)
            position_ids.append(start + k)
            segment.append(number[node])
            if k > 0:
                source.append(i - 1)              # the previous token of the same segment
            elif node is root:
                source.append(i)                  # the first prompt token: never trained
            else:
                source.append(end[node.parent])   # the last token of the path above it
        depth[node] = start + len(node.tokens)
        end[node] = len(input_ids) - 1 if node.tokens else end[node.parent]

    # 3. Loss weights: every (trained leaf, response token) pair of the flat loss adds to the
    #    unique token it is made of (see the module docstring for the sign split).
    size = len(input_ids)
    weight, count = [0.0] * size, [0] * size
    advantage = [[0.0, 0.0] for _ in range(size)]
    count_by_sign = [[0, 0] for _ in range(size)]
    sequence_tokens = []
    for seq in sequences:
        rows = [first[node] + k for node in tree.ancestors(seq.leaf)[1:] for k in range(len(node.tokens))]
        if list(seq.prompt_ids) != root.tokens or [input_ids[i] for i in rows] != list(seq.response_ids):
            raise ValueError("a training sequence no longer matches its leaf's path in the tree "
                             "(was the tree changed after to_sequences?)")
        if len(seq.advantages) != len(rows):
            raise ValueError(f"a training sequence has {len(seq.advantages)} advantages for {len(rows)} tokens")
        w = 1.0 if aggregation == "token" else 1.0 / max(len(rows), 1)
        for i, a in zip(rows, seq.advantages):
            weight[i] += w
            count[i] += 1
            if a != 0:
                sign = 0 if a > 0 else 1
                advantage[i][sign] += w * a
                count_by_sign[i][sign] += 1
        sequence_tokens.append(rows)

    return PackedForest(
        input_ids, position_ids, source, segment, lineage, weight, count, advantage, count_by_sign,
        sequence_tokens,
        n_tokens=sum(len(s.response_ids) for s in sequences),
        n_sequences=len(sequences),
        aggregation=aggregation)


def pack_sequences(sequences: Sequence[tree.TrainSequence], aggregation: str = "token") -> list[PackedForest]:
    """One `PackedForest` per forest among `sequences`."""
    return [pack_forest([sequences[k] for k in group], aggregation) for group in forests_of(sequences)]


def token_ratio(sequences: Sequence[tree.TrainSequence]) -> float:
    """Tokens a packed forward processes / tokens the flat forward processes, for the same training
    sequences (prompts included, padding excluded on both sides). Below 1 as soon as two trained
    leaves share a prompt or a prefix; 1 for a single chain."""
    forests_of(sequences)  # checks that every sequence knows its leaf
    flat = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    unique = sum(len(node.tokens) for node in {n for s in sequences for n in tree.ancestors(s.leaf)})
    return unique / flat if flat else 1.0


def group_by_size(items: Sequence[int], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive runs of `items` whose `sizes[item]` add up to at most `limit` (an item larger than
    the limit gets a run of its own). Used to fill micro- and mini-batches with whole forests."""
    runs: list[list[int]] = []
    total = 0
    for item in items:
        if runs and total + sizes[item] <= limit:
            runs[-1].append(item)
            total += sizes[item]
        else:
            runs.append([item])
            total = sizes[item]
    return runs


# --------------------------------------------------------------------------------------------------
# Tensors for one forward pass
# --------------------------------------------------------------------------------------------------


def tree_attention_mask(forest: PackedForest, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [width, width] of one packed row: 0 where query i may attend to
    key j, the dtype's most negative number elsewhere.

    i may attend to j when j <= i and j's segment is i's own segment or one of its ancestors.
    Because ancestors come first in the row, "j <= i" only matters inside a segment, where it is
    the ordinary causal rule; the prompt (segment 0, everybody's ancestor) is causal too.
    Padding (positions past the forest) forms one more segment that sees only padding, so no
    query row is fully masked (that would give NaN) and no real token ever sees padding.
    """
    n = len(forest.lineage)
    related = torch.zeros(n + 1, n + 1, dtype=torch.bool)   # related[s, t]: t is s or above s
    for s, line in enumerate(forest.lineage):
        related[s, line] = True
    related[n, n] = True
    segment = torch.full((width,), n, dtype=torch.long)
    segment[:len(forest)] = torch.tensor(forest.segment, dtype=torch.long)
    allowed = related[segment[:, None], segment[None, :]]
    allowed &= torch.ones(width, width, dtype=torch.bool).tril()
    return torch.zeros(width, width, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class PackedBatch:
    """Packed forests, one per row, right-padded to the longest. Per-token tensors are aligned
    with input_ids (not shifted): position i holds the quantities of token i itself."""

    input_ids: torch.Tensor        # [B, S]
    position_ids: torch.Tensor     # [B, S]
    attention_mask: torch.Tensor   # [B, 1, S, S] additive, in the model's dtype
    source: torch.Tensor           # [B, S] position whose logits predict token i
    weight: torch.Tensor           # [B, S] 0 on prompt and padding
    count: torch.Tensor            # [B, S]
    advantage: torch.Tensor        # [B, S, 2] positive part, negative part
    count_by_sign: torch.Tensor    # [B, S, 2]
    n_tokens: int                  # flat response tokens of these forests' sequences
    n_sequences: int
    aggregation: str


def collate_packed(forests: Sequence[PackedForest], pad_token_id: int, device="cpu",
                   dtype: torch.dtype = torch.float32) -> PackedBatch:
    """Tensors for a forward over `forests`; `dtype` is the model's (the mask's dtype)."""
    width = max(len(f) for f in forests)
    if len({f.aggregation for f in forests}) != 1:
        raise ValueError("cannot batch forests packed for different aggregations")

    def padded(name, fill, tensor_dtype):
        rows = [getattr(f, name) + [fill] * (width - len(f)) for f in forests]
        return torch.tensor(rows, dtype=tensor_dtype, device=device)

    mask = torch.stack([tree_attention_mask(f, width, dtype) for f in forests]).unsqueeze(1)
    return PackedBatch(
        input_ids=padded("input_ids", pad_token_id, torch.long),
        position_ids=padded("position_ids", 0, torch.long),
        attention_mask=mask.to(device),
        source=padded("source", 0, torch.long),
        weight=padded("weight", 0.0, torch.float32),
        count=padded("count", 0, torch.float32),
        advantage=padded("advantage", [0.0, 0.0], torch.float32),
        count_by_sign=padded("count_by_sign", [0, 0], torch.float32),
        n_tokens=sum(f.n_tokens for f in forests),
        n_sequences=sum(f.n_sequences for f in forests),
        aggregation=forests[0].aggregation)
