"""Tree packing: the training forward over a forest's *unique* tokens (`--pack_tree`).

Skip this file on a first reading: `TreeLayout` is a batch layout that `treerl.update` takes and
`treerl.policy_loss` consumes like the flat one, giving exactly the flat loss
(tests/test_packing.py checks it) with less compute, by running each token of a forest through
the model once instead of once per leaf below it. train.py passes it with --pack_tree (default).

The flat update (`logprobs.collate`) turns every leaf of a forest into its own sequence, prompt and
shared prefixes included, so a segment high in the tree is run through the model once per leaf
below it. A forest of M = 4 trees with one round of forking (L = 1, N = T = 2) has 20 leaves, and
its prompt is processed 20 times. Tree packing lays the tokens out once; a tree, as one row:

    root  "Q"   (prompt)                    row:     Q  a  b  c  d  e
     └── "ab"                               segment: 0  1  1  2  2  3
          ├── "cd"    leaf 1                position: 0  1  2  3  4  3
          └── "e"     leaf 2

and gives the model two things that make the row behave like the two flat sequences "Qabcd" and
"Qabe" at once:

- **position ids** that continue from the end of the parent segment (e sits at position 3, like
  c, because both follow "Qab"), so rotary embeddings see the same positions as in the flat rows;
- a **4D attention mask** [1, 1, S, S], True (additive: 0) where a query may look and False (a
  very large negative number) elsewhere: every token sees itself, the earlier tokens of its own
  segment and all tokens of its ancestor segments, and nothing else (e does not see c or d).
  Softmax gives the blocked entries exact zeros, so each token's hidden states, and so its
  log-prob, are those of the flat sequence it belongs to.

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
negative part), two of the advantage columns that `treerl.policy_loss` applies f to and adds up;
the KL term, which does not involve A, is weighted by sum_l w_l. Leaves not kept for training (`keep_leaves`) contribute nothing, and
segments that lead only to them are left out of the row.

What it costs
-------------
Each token goes through the model once (plus one copy of the prompt per tree, below), so the MLPs
and projections do about (unique / flat) of the flat work (`token_ratio`). Attention is where a
packed row pays: SDPA scores every query against every key of its row, masked or not, so a
query's cost grows with the row's length, where a flat row is one leaf's path: on the default CPU
model a query in a row of 256 tokens costs about twice one in a row of 80. The causal case, which
skips the blocks above the diagonal, is barely cheaper than a masked row of the same length, so
clever orderings buy little: only shorter rows do. Hence:

- **one row per tree, not per forest** (`layout_rows`): the trees of a forest (the children of the
  prompt) share nothing but the prompt, so each gets its own row with a copy of the prompt (short
  ones may share a row, up to the length of the longest). Rows are about M times shorter than the
  forest's, and attention over them about M times cheaper than over one forest row;
- **micro-batches of trees of about the same length** (`TreeLayout`, `group_by_length`):
  little padding, and a short tree never waits for a long one's row length;
- a **boolean mask** (SDPA's own form, a quarter of an additive float mask's memory), made by one
  gather from the small segment relation; a micro-batch's tensors are built once and serve the
  old log-probs and the update.

So on a CPU the packed update runs faster than the flat one, and more so the more a forest shares
(L = 2 more than L = 1); laid out one row per forest, attention ate the gain. What is left is
mostly attention over the rows, and the prompt copies and padding. On a GPU the flat rows get fused
causal kernels that the tree mask does not, and packing saves memory rather than time. The
measurements (`python -m eval.bench throughput`): docs/performance.md, section "Where the default
run's time goes, on a slow CPU". The mask is dense, [rows, 1, W, W] per micro-batch with W the
longest tree: trees of thousands of tokens need a lot of memory for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

import tree
from logprobs import aggregation_weight, hidden_states, target_logprobs

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
    position_ids: list[int]  # length of the path before the token (as in the flat row)
    source: list[int]  # row index of the token whose logits predict this one
    segment: list[int]  # index of the token's segment (0 = the prompt)
    lineage: list[list[int]]  # per segment: itself and its ancestor segments
    weight: list[float]  # sum of w_l over the trained leaves containing the token
    count: list[int]  # how many trained leaves contain the token
    advantage: list[list[float]]  # [sum of w_l * A_l where A_l > 0, same where A_l < 0]
    count_by_sign: list[list[int]]  # [leaves where A_l > 0, leaves where A_l < 0]
    sequence_tokens: list[list[int]]  # per training sequence: row index of each response token
    n_tokens: int  # response tokens of its sequences, flat (token denominator)
    n_sequences: int  # its training sequences (sequence denominator)
    aggregation: str  # "token" or "sequence": what the weights were made for
    one_row: bool = False  # laid out as one row, its trees after a single copy of the prompt

    def __len__(self) -> int:
        return len(self.input_ids)

    # What collating needs, computed once per forest (a forest is collated for the old log-probs
    # and again in every epoch). The forest must not be changed after it is first collated.

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-token lists as tensors."""
        return {
            "input_ids": torch.tensor(self.input_ids),
            "position_ids": torch.tensor(self.position_ids),
            "source": torch.tensor(self.source),
            "segment": torch.tensor(self.segment),
            "weight": torch.tensor(self.weight, dtype=torch.float32),
            "count": torch.tensor(self.count, dtype=torch.float32),
            "advantage": torch.tensor(self.advantage, dtype=torch.float32).reshape(-1, 2),
            "count_by_sign": torch.tensor(self.count_by_sign, dtype=torch.float32).reshape(-1, 2),
        }

    @cached_property
    def related(self) -> torch.Tensor:
        """[n, n] bool over the n segments: related[s, t] when t is s or an ancestor of s."""
        related = torch.zeros(len(self.lineage), len(self.lineage), dtype=torch.bool)
        for s, line in enumerate(self.lineage):
            related[s, line] = True
        return related

    @cached_property
    def trees(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Indices of the prompt's tokens, and of each tree's tokens (a tree: a child of the root
        and everything below it), in row order. Trees share nothing but the prompt."""
        top = torch.tensor([line[1] if len(line) > 1 else 0 for line in self.lineage])  # segment -> tree
        of_token = top[self.tensors["segment"]]
        return (
            (of_token == 0).nonzero().flatten(),
            [(of_token == t).nonzero().flatten() for t in of_token.unique().tolist() if t != 0],
        )


def forests_of(sequences: Sequence[tree.TrainSequence]) -> list[list[int]]:
    """Indices of the sequences grouped by the forest (prompt root) their leaf belongs to, in
    order of first appearance."""
    groups: dict[int, list[int]] = {}
    for k, seq in enumerate(sequences):
        if seq.leaf is None:
            raise ValueError(
                "tree packing needs sequences made by tree.to_sequences (each with its "
                f"leaf); sequence {k} has leaf=None"
            )
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
        raise ValueError("pack_forest takes the sequences of one forest; group several with forests_of")
    if not root.tokens:
        raise ValueError("tree packing needs a non-empty prompt: its last token predicts the first response token")

    # 1. The segments on the paths to the trained leaves, parents before children (depth first),
    #    so all of a token's ancestors sit to its left in the row.
    #    Only the trained part of the forest is walked (a tree's pack does not visit its siblings).
    trained = {node for seq in sequences for node in tree.ancestors(seq.leaf)}
    nodes, stack = [], [root]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(child for child in reversed(node.children) if child in trained)
    number = {node: s for s, node in enumerate(nodes)}
    lineage = [[number[a] for a in tree.ancestors(node)] for node in nodes]

    # 2. The row: tokens, their positions, and where each one is predicted from.
    input_ids, position_ids, source, segment = [], [], [], []
    first: dict[tree.Node, int] = {}  # row index of the segment's first token
    end: dict[tree.Node, int] = {}  # row index of the last token on the path to the segment's end
    depth: dict[tree.Node, int] = {}  # number of tokens on that path (the next position id)
    for node in nodes:
        start = 0 if node is root else depth[node.parent]
        first[node] = len(input_ids)
        for k, token in enumerate(node.tokens):
            i = len(input_ids)
            input_ids.append(token)
            position_ids.append(start + k)
            segment.append(number[node])
            if k > 0:
                source.append(i - 1)  # the previous token of the same segment
            elif node is root:
                source.append(i)  # the first prompt token: never trained
            else:
                source.append(end[node.parent])  # the last token of the path above it
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
            raise ValueError(
                "a training sequence no longer matches its leaf's path in the tree "
                "(was the tree changed after to_sequences?)"
            )
        if len(seq.advantages) != len(rows):
            raise ValueError(f"a training sequence has {len(seq.advantages)} advantages for {len(rows)} tokens")
        w = aggregation_weight(len(rows), aggregation)
        for i, a in zip(rows, seq.advantages):
            weight[i] += w
            count[i] += 1
            if a != 0:
                sign = 0 if a > 0 else 1
                advantage[i][sign] += w * a
                count_by_sign[i][sign] += 1
        sequence_tokens.append(rows)

    return PackedForest(
        input_ids,
        position_ids,
        source,
        segment,
        lineage,
        weight,
        count,
        advantage,
        count_by_sign,
        sequence_tokens,
        n_tokens=sum(len(s.response_ids) for s in sequences),
        n_sequences=len(sequences),
        aggregation=aggregation,
    )


def pack_trees(sequences: Sequence[tree.TrainSequence], aggregation: str = "token") -> list[list[PackedForest]]:
    """Per forest among `sequences`, one `PackedForest` per tree (a child of the prompt and the
    trained leaves below it), each holding the prompt and that tree. Trees share only the prompt,
    so the losses of a forest's trees add up to the forest's loss; `TreeLayout` batches
    trees, not forests, to make rows of equal length."""
    return [
        [pack_forest([sequences[k] for k in ks], aggregation) for ks in trees_of(sequences, group)]
        for group in forests_of(sequences)
    ]


def trees_of(sequences: Sequence[tree.TrainSequence], forest: Sequence[int]) -> list[list[int]]:
    """The indices `forest` (of one forest's sequences) grouped by the tree (child of the prompt)
    their leaf is in, in order of first appearance."""
    trees: dict[int, list[int]] = {}
    for k in forest:
        path = tree.ancestors(sequences[k].leaf)
        trees.setdefault(id(path[1] if len(path) > 1 else path[0]), []).append(k)
    return list(trees.values())


def token_ratio(sequences: Sequence[tree.TrainSequence]) -> float:
    """Tokens a packed forward processes / tokens the flat forward processes, for the same training
    sequences (prompts included, padding excluded on both sides). Below 1 as soon as two trained
    leaves share a prompt or a prefix; 1 for a single chain."""
    forests_of(sequences)  # checks that every sequence knows its leaf
    flat = sum(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    unique = sum(len(node.tokens) for node in {n for s in sequences for n in tree.ancestors(s.leaf)})
    return unique / flat if flat else 1.0


def group_by_length(
    items: Sequence[int],
    lengths: Sequence[int],
    sizes: Sequence[int],
    limit: int,
    overhead: int = 256,
    token_limit: int = 0,
) -> list[list[int]]:
    """Runs of `items` for micro-batches whose rows are padded to their longest: items sorted
    longest first, then cut into consecutive runs of at most `limit` in `sizes` and, with
    `token_limit`, at most that many padded tokens (items x longest length; an item over either
    limit gets a run of its own) so as to minimise the padded tokens, sum over runs of (items x
    longest length), plus `overhead` tokens per run (the fixed cost of one more forward). Exact,
    by dynamic programming over the cut points."""
    order = sorted(items, key=lambda i: -lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j items
    cut = [0] * (len(order) + 1)  # where the last run of that best starts
    for j in range(1, len(order) + 1):
        total = 0
        for i in range(j - 1, -1, -1):  # the last run: order[i:j], longest order[i]
            total += sizes[order[i]]
            too_long = token_limit and (j - i) * lengths[order[i]] > token_limit  # grows as i falls
            if (total > limit or too_long) and i < j - 1:
                break
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(order)
    while j:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


# --------------------------------------------------------------------------------------------------
# The model's rows: trees, not forests (unless the prompt costs more than the attention)
# --------------------------------------------------------------------------------------------------


def attention_cost(config) -> float:
    """kappa: the multiply-adds a row spends per (query, key) pair of its attention, over those it
    spends per token on everything else of a layer, for a Llama-shaped `config` (q, k, v and o
    projections, a gated MLP). A row of n tokens then costs about n + kappa * n^2 token-units.

    The output layer is left out: `TreeLayout` weighs prompt tokens, which it never scores.
    SmolLM2-135M gives about 3e-4 (a 576-wide layer, a 1,536-wide MLP); the default tiny model,
    whose layers are narrow, about 1e-3.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config.intermediate_size
    per_pair = 2 * heads * head_dim  # q.k and the weighted sum of v
    return per_pair / per_token


def shares_its_prompt(trees: Sequence[PackedForest], kappa: float) -> bool:
    """Whether `trees` (of one forest, each packed with the prompt) are cheaper as one row, the
    prompt once, than as a row per tree, each with a copy of the prompt: the prompt copies saved,
    against the attention of one long row instead of several short ones (the cost model of
    `attention_cost`). Wide layers and short rows (a real model's forests) favour one row; narrow
    layers and long trees a row per tree."""
    if len(trees) < 2:
        return False
    prompt = len(trees[0].trees[0])
    rows = [len(t) for t in trees]
    one = prompt + sum(n - prompt for n in rows)
    return one + kappa * one**2 < sum(n + kappa * n**2 for n in rows)


def runs_of_trees(
    leaves: Sequence[int], limit: int, tokens: Sequence[int] = (), token_limit: int = 0
) -> list[list[int]]:
    """Consecutive runs of a forest's trees (their indices) holding at most `limit` leaves each and,
    with `token_limit`, at most that many of the trees' `tokens` (a tree over either limit alone;
    no limit when 0): the trees that may share one row, so that a shared row holds no more leaves,
    nor positions, than a micro-batch."""
    runs: list[list[int]] = []
    held = length = 0
    for i, n in enumerate(leaves):
        t = tokens[i] if token_limit else 0
        if runs and (not limit or held + n <= limit) and (not token_limit or length + t <= token_limit):
            runs[-1].append(i)
            held, length = held + n, length + t
        else:
            runs.append([i])
            held, length = n, t
    return runs


def layout_rows(forests: Sequence[PackedForest]) -> list[list[tuple[int, torch.Tensor]]]:
    """The model's rows for `forests`: each row a list of pieces (forest, indices of its tokens in
    the forest's order), a piece being a prompt and one or more of the trees below it.

    A row costs attention in proportion to its length squared, so a forest is not laid out as one
    row unless it asks to be (`one_row`, chosen by `TreeLayout`): its trees are, longest first,
    each put in the first row it fits in (first-fit decreasing), a row holding at most as many
    tokens as the longest prompt + tree. A tree that joins a row holding its own prompt does not
    bring the prompt again. So a row is one tree, or a few short ones.
    """
    whole = [[(b, torch.arange(len(f)))] for b, f in enumerate(forests) if f.one_row]
    prompts = [f.trees[0] for f in forests]
    trees = [(b, t) for b, f in enumerate(forests) if not f.one_row for t in f.trees[1]]
    trees += [(b, prompts[b][:0]) for b, f in enumerate(forests) if not f.one_row and not f.trees[1]]
    if not trees:
        return whole
    capacity = max(len(prompts[b]) + len(t) for b, t in trees)
    rows: list[dict[int, list[torch.Tensor]]] = []  # per row: forest -> its trees there
    sizes: list[int] = []
    for b, t in sorted(trees, key=lambda bt: -len(bt[1])):  # stable: ties keep the forests' order
        cost = [len(t) + (0 if b in row else len(prompts[b])) for row in rows]
        r = next((r for r, row in enumerate(rows) if sizes[r] + cost[r] <= capacity), len(rows))
        if r == len(rows):
            rows.append({})
            sizes.append(0)
            cost.append(len(prompts[b]) + len(t))
        sizes[r] += cost[r]
        rows[r].setdefault(b, []).append(t)
    return whole + [[(b, torch.cat([prompts[b], *ts]).sort().values) for b, ts in row.items()] for row in rows]


# --------------------------------------------------------------------------------------------------
# Tensors for one forward pass
# --------------------------------------------------------------------------------------------------


def attention_mask(segments: torch.Tensor, related: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, W] segment ids of each row's tokens -> the mask [R, W, W]: query i may attend to key j
    when j <= i and related[i's segment, j's segment]. Boolean (True: may attend) for
    dtype=torch.bool, else additive: 0 where i may attend, the dtype's most negative number
    elsewhere. Built with one gather from the small segment relation."""
    width = segments.shape[-1]
    allowed = related[segments[:, :, None], segments[:, None, :]]
    allowed &= torch.ones(width, width, dtype=torch.bool).tril()
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass
class PackedBatch:
    """Packed forests in two layouts; the micro-batch that `treerl.policy_loss` takes from
    `TreeLayout`.

    Per forest ([B, S], one forest per row, right-padded; position i holds token i of the forest's
    `PackedForest` layout): the tokens to score, their loss weights (three advantage columns, the
    sign split of the module docstring, and a column for the pairs whose advantage is 0, which
    count in the statistics), and the log-probs that `logprobs` returns. The model's rows ([R, W], `layout_rows`: one tree or a few
    per row): what goes through the model. `predictor` links the two.
    """

    input_ids: torch.Tensor  # [B, S]
    advantages: torch.Tensor  # [B, S, 3] sum of w * A over the pairs with A > 0, with A < 0, and 0
    pairs: torch.Tensor  # [B, S, 3] (leaf, token) pairs with A > 0, A < 0, A = 0
    weight: torch.Tensor  # [B, S] sum of w over all pairs (the KL term's weight); 0 on prompt and padding
    row_ids: torch.Tensor  # [R, W] the model's input
    row_positions: torch.Tensor  # [R, W] position ids (tree positions)
    attention_mask: torch.Tensor  # [R, 1, W, W] boolean, True where a query may attend to a key
    predictor: torch.Tensor  # [B, S] index into the R * W row positions: whose logits score token i

    def logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        """log pi(token) under softmax(logits / temperature) for every token of packed forests that
        some trained leaf's response holds, 0 elsewhere (prompt, padding): [B, S].

        One forward over the unique tokens, laid out in the model's rows (a tree per row, or a few
        short ones) with the tree mask and tree positions; token i of a forest is scored with the
        hidden state at `predictor[i]`, the row position of the token before it on its own path
        (logprobs.target_logprobs). The result is in the per-forest layout of `input_ids`.

        The mask goes to SDPA as it is, boolean (its fastest form on CPU); other attentions (eager
        adds the mask to its scores) get it additive, in the model's dtype.
        """
        mask = self.attention_mask
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        hidden = hidden_states(model, input_ids=self.row_ids, attention_mask=mask, position_ids=self.row_positions)
        scored = self.pairs.sum(-1) > 0
        logp = target_logprobs(model, hidden.flatten(0, 1)[self.predictor[scored]], self.input_ids[scored], temperature)
        return torch.zeros(scored.shape, device=logp.device).masked_scatter(scored, logp)

    def to(self, device) -> PackedBatch:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def collate_packed(forests: Sequence[PackedForest], pad_token_id: int, device="cpu") -> PackedBatch:
    """Tensors for a forward over `forests`."""
    if len({f.aggregation for f in forests}) != 1:
        raise ValueError("cannot batch forests packed for different aggregations")
    tensors = [f.tensors for f in forests]

    def padded(name, fill=0):  # the per-forest layout [B, S, ...]
        return torch.nn.utils.rnn.pad_sequence([t[name] for t in tensors], batch_first=True, padding_value=fill).to(
            device
        )

    # Every token of the batch gets a number g, forest after forest (start[b] + i); number n is
    # padding. Per number: its token, position, segment (numbered across forests: `related` is
    # block-diagonal, its last segment padding, related only to itself) and the number of the token
    # whose logits predict it.
    start = torch.tensor([0] + [len(f) for f in forests]).cumsum(0)
    first_segment = torch.tensor([0] + [len(f.lineage) for f in forests]).cumsum(0)
    n = int(start[-1])
    related = torch.block_diag(*[f.related for f in forests], torch.ones(1, 1, dtype=torch.bool))
    token = torch.cat([t["input_ids"] for t in tensors] + [torch.tensor([pad_token_id])])
    position = torch.cat([t["position_ids"] for t in tensors] + [torch.tensor([0])])
    segment = torch.cat([t["segment"] + s for t, s in zip(tensors, first_segment)] + [first_segment[-1:]])
    source = torch.cat([t["source"] + g for t, g in zip(tensors, start)] + [start[-1:]])

    # The model's rows, as token numbers [R, W].
    grid = torch.nn.utils.rnn.pad_sequence(
        [torch.cat([start[b] + piece for b, piece in row]) for row in layout_rows(forests)],
        batch_first=True,
        padding_value=n,
    )
    rows, width = grid.shape
    # Where each token is predicted from, as a flat index into the R * W row positions: the row
    # position of its source *in its own row* (a tree's first token is predicted at its row's copy
    # of the prompt). A prompt token is in several rows; the first one's copy is used.
    r = torch.arange(rows)[:, None].expand_as(grid)
    at = torch.zeros(rows, n + 1, dtype=torch.long)  # at[r, g]: row position of g in row r
    at[r, grid] = r * width + torch.arange(width)
    predicted_at = at[r, source[grid]]
    predictor = torch.zeros(n + 1, dtype=torch.long)
    for k in reversed(range(rows)):  # the first row containing g wins
        predictor[grid[k]] = predicted_at[k]
    numbers = torch.nn.utils.rnn.pad_sequence(
        [torch.arange(len(f)) + g for f, g in zip(forests, start)], batch_first=True, padding_value=n
    )

    advantage, by_sign, count = padded("advantage"), padded("count_by_sign"), padded("count")
    return PackedBatch(
        input_ids=padded("input_ids", pad_token_id),
        advantages=torch.cat([advantage, torch.zeros_like(advantage[..., :1])], -1),
        pairs=torch.cat([by_sign, count[..., None] - by_sign.sum(-1, keepdim=True)], -1),
        weight=padded("weight"),
        row_ids=token[grid].to(device),
        row_positions=position[grid].to(device),
        attention_mask=attention_mask(segment[grid], related, torch.bool)[:, None].to(device),
        predictor=predictor[numbers].to(device),
    )


# --------------------------------------------------------------------------------------------------
# The layout treerl.update takes
# --------------------------------------------------------------------------------------------------


class TreeLayout:
    """`treerl.Layout` with tree packing: a unit is a tree (a prompt and one child of it, with the
    trained leaves below), so every token of a forest goes through the model once (its prompt
    once per tree), not once per leaf. The sequences find their forest through their leaves
    (`TrainSequence.leaf`).

    The loss is the flat loss, so with the whole rollout in one optimizer step (mini_batch_size 0,
    the default) the gradient is the flat layout's too, up to float rounding. A forest's trees are
    one group: mini-batches hold whole forests, as many as fit in mini_batch_size leaves (at least
    one forest each), so with mini_batch_size > 0 the rollout is split into optimizer steps by
    forest, not by the flat layout's random split of leaves. Micro-batches hold whole trees of the
    mini-batch (a forest's trees share only the prompt, so their losses add up), as many as fit in
    micro_batch_size leaves, longest first: trees of about the same length share a forward, and
    the rows need little padding.

    With `attention_cost` (kappa of the model, `attention_cost(model.config)`), trees of a forest
    whose prompt copies would cost more than one longer row (`shares_its_prompt`) are one unit
    instead, laid out as one row with the prompt once: runs of consecutive trees of at most
    `row_leaves` leaves and `row_tokens` positions (train.py passes micro_batch_size and
    micro_batch_tokens, so that a shared row is no larger than a micro-batch; 0: no limit). The
    loss is the same either way.
    """

    def __init__(
        self,
        sequences: Sequence[tree.TrainSequence],
        aggregation: str,
        pad_token_id: int,
        attention_cost: float | None = None,
        row_leaves: int = 0,
        row_tokens: int = 0,
    ):
        self.trees: list[PackedForest] = []  # the units: trees, or runs of trees laid out as one row
        self.groups: list[list[int]] = []
        for forest in forests_of(sequences):
            trees = trees_of(sequences, forest)
            packed = [pack_forest([sequences[k] for k in t], aggregation) for t in trees]
            units = packed
            if attention_cost is not None:
                units = []
                prompt = len(packed[0].trees[0])  # a shared row: the prompt once, then each tree's own tokens
                own = [len(p) - prompt for p in packed]
                row_budget = max(row_tokens - prompt, 1) if row_tokens else 0
                for run in runs_of_trees([p.n_sequences for p in packed], row_leaves, own, row_budget):
                    if shares_its_prompt([packed[i] for i in run], attention_cost):
                        shared = pack_forest([sequences[k] for i in run for k in trees[i]], aggregation)
                        units.append(dataclasses.replace(shared, one_row=True))
                    else:
                        units += [packed[i] for i in run]
            self.groups.append(list(range(len(self.trees), len(self.trees) + len(units))))
            self.trees += units
        self.leaves = [t.n_sequences for t in self.trees]
        self.tokens = [t.n_tokens for t in self.trees]
        self.lengths = [len(t) for t in self.trees]
        self.pad_token_id = pad_token_id
        # A micro-batch's tensors are built once, kept on the CPU, and reused: the old (and
        # reference) log-probs and every epoch whose mini-batches match go through the same ones.
        self.built: dict[tuple[int, ...], PackedBatch] = {}

    def micro_batches(self, units: list[int], size: int, tokens: int = 0) -> list[list[int]]:
        return group_by_length(sorted(units), self.lengths, self.leaves, size, token_limit=tokens)

    def batch(self, units: list[int], device) -> PackedBatch:
        key = tuple(units)
        if key not in self.built:
            self.built[key] = collate_packed([self.trees[k] for k in units], self.pad_token_id)
        return self.built[key].to(device)
