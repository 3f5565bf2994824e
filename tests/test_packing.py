"""Tests for packing.py: a packed forest gives the flat batch's log-probs, loss and gradients."""

import copy
import functools
import random
from types import SimpleNamespace

import pytest
import torch

import logprobs
import packing
import tree
import treerl
from treerl import UpdateConfig

ATOL = 1e-5  # float32: packed and flat differ only by the order of floating-point sums


def random_forest(rng: random.Random, trees: int = 3, depth: int = 3) -> tree.Node:
    """A prompt with `trees` trees below it; each node forks into 1-3 segments of 1-5 tokens, down
    to `depth` segments per response (like EPTree with L = 2). Leaves get random rewards and are
    sometimes unfinished (truncated)."""
    token = lambda: rng.randrange(3, 90)  # noqa: E731  (ids of the character tokenizer, no specials)
    root = tree.Node([token() for _ in range(rng.randint(2, 5))])

    def grow(node: tree.Node, level: int) -> None:
        for _ in range(rng.randint(1, 3) if level > 1 else 1):
            child = node.add([token() for _ in range(rng.randint(1, 5))])
            if level < depth and rng.random() < 0.7:
                grow(child, level + 1)
            else:
                child.reward = float(rng.random() < 0.5)
                child.finished = rng.random() < 0.7

    for _ in range(trees):
        grow(root, 1)
    return root


def random_sequences(seed: int, keep=None, truncated_penalty=None, forests: int = 3):
    rng = random.Random(seed)
    sequences = []
    for _ in range(forests):
        root = random_forest(rng)
        advantages = tree.process_rewards(root)
        sequences += tree.to_sequences(root, advantages, keep=keep, rng=rng, truncated_penalty=truncated_penalty)
    return sequences


def pack_sequences(sequences, aggregation: str = "token") -> list[packing.PackedForest]:
    """One `PackedForest` per forest among `sequences`: each forest as one row, the layout these
    tests compare with the flat one (`packing.TreeLayout` packs each tree of a forest on its own)."""
    return [packing.pack_forest([sequences[k] for k in group], aggregation) for group in packing.forests_of(sequences)]


def tree_attention_mask(forest: packing.PackedForest, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [width, width] of a forest laid out as one row: 0 where query i
    may attend to key j, the dtype's most negative number elsewhere (`packing.attention_mask`).

    i may attend to j when j <= i and j's segment is i's own segment or one of its ancestors.
    Because ancestors come first in the row, "j <= i" only matters inside a segment, where it is
    the ordinary causal rule; the prompt (segment 0, everybody's ancestor) is causal too.
    Padding (positions past the forest) forms one more segment that sees only padding, so no
    query row is fully masked (that would give NaN) and no real token ever sees padding.
    The model's rows (`packing.collate_packed`) follow the same rule, over trees of several forests.
    """
    related = torch.block_diag(forest.related, torch.ones(1, 1, dtype=torch.bool))
    segments = torch.full((1, width), len(forest.lineage), dtype=torch.long)
    segments[0, : len(forest)] = forest.tensors["segment"]
    return packing.attention_mask(segments, related, dtype)[0]


def flat_positions(sequences):
    """For every sequence, the flat batch's columns of its response tokens (the collate rule)."""
    return [range(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)) for s in sequences]


def packed_positions(sequences):
    """For every sequence (in the order given), (row, indices) of its response tokens in the
    packed batch made by pack_sequences."""
    where = [None] * len(sequences)
    for row, (group, forest) in enumerate(zip(packing.forests_of(sequences), pack_sequences(sequences))):
        for k, tokens in zip(group, forest.sequence_tokens):
            where[k] = (row, tokens)
    return where


def packed_to_flat(values, sequences, batch):
    """Copy per-unique-token values into the flat layout: each leaf's tokens get their values."""
    out = torch.zeros(batch.mask.shape)
    for k, ((row, tokens), cols) in enumerate(zip(packed_positions(sequences), flat_positions(sequences))):
        out[k, list(cols)] = values[row, tokens]
    return out


# --------------------------------------------------------------------------------------------------
# The layout and the mask
# --------------------------------------------------------------------------------------------------


def test_layout_and_mask_of_a_small_tree():
    #   root [10, 11] ── x [12, 13] ─┬─ y [14]       (leaves y and z share x)
    #                                └─ z [15, 16]
    root = tree.Node([10, 11])
    x = root.add([12, 13])
    y, z = x.add([14], finished=True), x.add([15, 16], finished=True)
    y.reward, z.reward = 1.0, 0.0
    sequences = tree.to_sequences(root, tree.process_rewards(root))
    forest = packing.pack_forest(sequences)
    assert forest.input_ids == [10, 11, 12, 13, 14, 15, 16]
    assert forest.position_ids == [0, 1, 2, 3, 4, 4, 5]  # z starts where y starts
    assert forest.source[2:] == [1, 2, 3, 3, 5]  # y and z both predicted at 13
    assert forest.count == [0, 0, 2, 2, 1, 1, 1]  # x is in both leaves
    allowed = tree_attention_mask(forest, 7, torch.float32) == 0
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # y sees the prompt, x and itself
        [1, 1, 1, 1, 0, 1, 0],  # z does not see its sibling y
        [1, 1, 1, 1, 0, 1, 1],
    ]
    # The blocked entries are the dtype's most negative number, not -inf (no NaN in softmax).
    assert tree_attention_mask(forest, 7, torch.bfloat16).min() == torch.finfo(torch.bfloat16).min
    # Token aggregation: each token weighs as many leaves as contain it; sequence: 1/len per leaf.
    assert packing.pack_forest(sequences).weight == [0, 0, 2, 2, 1, 1, 1]
    assert packing.pack_forest(sequences, "sequence").weight == pytest.approx(
        [0, 0, 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 3, 1 / 4, 1 / 4]
    )


def test_token_ratio_is_below_one_for_a_forked_tree_and_one_for_a_chain():
    root = tree.Node([10, 11, 12])
    top = root.add([20, 21, 22, 23])
    for tokens, reward in (([30, 31], 1.0), ([32], 0.0), ([33, 34, 35], 0.0)):
        top.add(tokens, finished=True).reward = reward
    sequences = tree.to_sequences(root, tree.process_rewards(root))
    # unique: 3 + 4 + 2 + 1 + 3 = 13; flat: 3 * (3 + 4) + 2 + 1 + 3 = 27
    assert packing.token_ratio(sequences) == pytest.approx(13 / 27)
    chain = tree.Node([10, 11])
    chain.add([5, 6, 7], finished=True).reward = 1.0
    assert packing.token_ratio(tree.to_sequences(chain, {chain.children[0]: 1.0})) == 1.0
    assert packing.token_ratio(random_sequences(0)) < 1


def test_sequences_without_leaves_are_refused():
    seq = tree.TrainSequence([1, 2], [3], [0.0], [1.0], 1.0, True, None)
    with pytest.raises(ValueError, match="leaf"):
        packing.pack_trees([seq])


def test_group_by_size_fills_runs_up_to_the_limit():
    assert treerl.group_by_size([0, 1, 2, 3], [2, 2, 5, 1], 4) == [[0, 1], [2], [3]]


def test_rows_and_micro_batches_keep_to_a_token_limit():
    """--micro_batch_tokens: a shared row holds trees only while the prompt and their own tokens fit
    (a tree over the limit alone), and a micro-batch only as many rows as fit, padded."""
    assert packing.runs_of_trees([2, 2, 2], 0, [10, 10, 10], 25) == [[0, 1], [2]]
    assert packing.runs_of_trees([2, 2, 2], 4, [10, 30, 10], 25) == [[0], [1], [2]]
    sequences = random_sequences(3, keep=5, truncated_penalty=-1.0)
    capped = packing.TreeLayout(sequences, "token", 0, attention_cost=0.0, row_leaves=8, row_tokens=40)
    for unit in capped.trees:
        assert len(unit) <= 40 or len(unit.trees[1]) == 1
    units = list(range(len(capped.trees)))
    for run in capped.micro_batches(units, 8, tokens=60):
        assert len(run) * max(capped.lengths[k] for k in run) <= 60 or len(run) == 1
    flat = treerl.FlatLayout(sequences, "token", 0)
    everything = list(range(len(sequences)))
    assert flat.micro_batches(everything, 4) == [everything[i : i + 4] for i in range(0, len(everything), 4)]
    limit = 2 * max(flat.lengths)
    runs = flat.micro_batches(everything, 4, tokens=limit)
    assert [k for run in runs for k in run] == everything and runs != flat.micro_batches(everything, 4)
    for run in runs:
        assert len(run) * max(flat.lengths[k] for k in run) <= limit


def test_group_by_length_finds_the_cheapest_cut():
    """The runs cover every item once, longest first, keep to the limits, and cost what the best of
    all cuts (tried one by one) costs."""
    import itertools

    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 7)
        lengths = [rng.randint(1, 60) for _ in range(n)]
        sizes = [rng.randint(1, 4) for _ in range(n)]
        limit, overhead = rng.randint(4, 9), rng.choice([0, 10, 50])
        token_limit = rng.choice([0, 80, 150])

        def fits(run, lengths=lengths, sizes=sizes, limit=limit, token_limit=token_limit):
            padded = len(run) * max(lengths[i] for i in run)
            return len(run) == 1 or (sum(sizes[i] for i in run) <= limit and (not token_limit or padded <= token_limit))

        runs = packing.group_by_length(range(n), lengths, sizes, limit, overhead, token_limit)
        order = [i for run in runs for i in run]
        assert sorted(order) == list(range(n))
        assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
        assert all(fits(run) for run in runs)

        def cost(cut_runs, lengths=lengths, overhead=overhead):
            return sum(len(r) * max(lengths[i] for i in r) + overhead for r in cut_runs)

        best = float("inf")
        for cuts in itertools.product([False, True], repeat=n - 1):
            split, run = [], [order[0]]
            for i, cut in zip(order[1:], cuts):
                if cut:
                    split.append(run)
                    run = []
                run.append(i)
            split.append(run)
            if all(fits(r) for r in split):
                best = min(best, cost(split))
        assert cost(runs) == best


def test_rows_hold_each_tree_once_with_its_prompt():
    sequences = random_sequences(seed=5, forests=3)
    forests = pack_sequences(sequences)
    rows = packing.layout_rows(forests)
    capacity = max(len(f.trees[0]) + len(t) for f in forests for t in f.trees[1])
    seen = {b: [] for b in range(len(forests))}
    for row in rows:
        assert sum(len(piece) for _, piece in row) <= capacity
        for b, piece in row:
            prompt = forests[b].trees[0]
            assert piece[: len(prompt)].tolist() == prompt.tolist()  # the prompt leads, once
            seen[b] += piece[len(prompt) :].tolist()
    for b, f in enumerate(forests):  # every tree token of every forest in exactly one row
        assert sorted(seen[b]) == sorted(torch.cat(f.trees[1]).tolist())


# --------------------------------------------------------------------------------------------------
# Packed == flat on random forests and a tiny random model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_log_probs_equal_the_flat_ones(model, tokenizer, attention, seed):
    model = copy.deepcopy(model)
    model.set_attn_implementation(attention)
    sequences = random_sequences(seed, keep=None)
    batch = logprobs.collate(sequences, tokenizer.pad_token_id)
    packed = packing.collate_packed(pack_sequences(sequences), tokenizer.pad_token_id)
    with torch.no_grad():
        flat = batch.logprobs(model)
        unique = packed.logprobs(model)
    assert torch.isfinite(unique).all()
    for k, ((row, tokens), cols) in enumerate(zip(packed_positions(sequences), flat_positions(sequences))):
        torch.testing.assert_close(unique[row, tokens], flat[k, list(cols)], rtol=0, atol=ATOL)
    assert packed.input_ids.numel() < batch.input_ids.numel()


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, stats = loss_fn()
    loss.backward()
    return loss.item(), stats, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("keep", [None, 4])
@pytest.mark.parametrize("truncated_penalty", [None, -1.0])
def test_packed_loss_and_gradients_equal_the_flat_ones(model, tokenizer, aggregation, keep, truncated_penalty):
    model = copy.deepcopy(model)
    sequences = random_sequences(2, keep=keep, truncated_penalty=truncated_penalty)
    if truncated_penalty is not None:
        # The case that needs the sign split: a token shared by leaves of both advantage signs.
        forests = pack_sequences(sequences)
        assert any(a[0] > 0 and a[1] < 0 for f in forests for a in f.advantage)
    batch = logprobs.collate(sequences, tokenizer.pad_token_id, aggregation)
    packed = packing.collate_packed(pack_sequences(sequences, aggregation), tokenizer.pad_token_id)
    # Response tokens (token aggregation) or responses (sequence aggregation) of the batch.
    denominator = sum(len(s.response_ids) for s in sequences) if aggregation == "token" else len(sequences)

    # Old and reference log-probs away from the current ones, so the ratio is clipped on some
    # tokens and the KL is not zero. They are drawn per unique token and copied into every leaf
    # containing it, as a recomputation would give.
    torch.manual_seed(0)
    with torch.no_grad():
        unique = packed.logprobs(model)
    old = unique + 0.3 * torch.randn(unique.shape)
    ref = unique + 0.3 * torch.randn(unique.shape)
    old_flat, ref_flat = packed_to_flat(old, sequences, batch), packed_to_flat(ref, sequences, batch)
    settings = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1)

    flat_loss, flat_stats, flat_grads = _loss_and_grads(
        model,
        lambda: treerl.policy_loss(batch.logprobs(model), old_flat, batch, denominator, ref_logp=ref_flat, **settings),
    )
    packed_loss, packed_stats, packed_grads = _loss_and_grads(
        model,
        lambda: treerl.policy_loss(packed.logprobs(model), old, packed, denominator, ref_logp=ref, **settings),
    )

    assert 0 < flat_stats["clip_frac"] < 1
    assert packed_loss == pytest.approx(flat_loss, abs=ATOL)
    for key in ("clip_frac", "kl", "ratio"):
        assert packed_stats[key] == pytest.approx(flat_stats[key], abs=ATOL)
    for p, q in zip(packed_grads, flat_grads):
        torch.testing.assert_close(p, q, rtol=0, atol=ATOL)
    assert max(g.abs().max().item() for g in flat_grads) > 1e-3  # the comparison is not vacuous


# The packed layouts: a row per tree; every forest one row, its prompt once (an attention that
# costs nothing); and the rule in between, at a cost that leaves some forests each way.
PACKED_LAYOUTS = {
    "tree rows": packing.TreeLayout,
    "forest rows": functools.partial(packing.TreeLayout, attention_cost=0.0),
    "mixed": functools.partial(packing.TreeLayout, attention_cost=0.01),
    "runs of trees": functools.partial(packing.TreeLayout, attention_cost=0.0, row_leaves=4),
    "runs of trees, token cap": functools.partial(packing.TreeLayout, attention_cost=0.0, row_leaves=4, row_tokens=40),
}


def test_trees_share_a_row_in_runs_no_larger_than_a_micro_batch():
    assert packing.runs_of_trees([2, 2, 1, 3, 5, 1], 4) == [[0, 1], [2, 3], [4], [5]]
    assert packing.runs_of_trees([2, 2, 1], 0) == [[0, 1, 2]]  # no limit: the whole forest
    sequences = random_sequences(3, keep=5, truncated_penalty=-1.0)
    layout = packing.TreeLayout(sequences, "token", 0, attention_cost=0.0, row_leaves=4)
    per_tree = packing.TreeLayout(sequences, "token", 0)
    assert any(u.one_row for u in layout.trees) and len(layout.trees) < len(per_tree.trees)
    for unit in layout.trees:
        assert unit.n_sequences <= 4 or len(unit.trees[1]) == 1  # a tree larger than the limit alone
    assert sum(layout.leaves) == sum(per_tree.leaves) == len(sequences)


def test_the_rule_between_prompt_copies_and_longer_rows():
    """attention_cost counts a Llama layer's multiply-adds (SmolLM2-135M's shapes here); a forest
    shares its prompt when one row costs less than a row per tree, so with wide layers (small
    kappa) and not with narrow ones. The "mixed" layout above does split the test forests."""
    smollm2 = SimpleNamespace(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536
    )
    per_token = 576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536
    assert packing.attention_cost(smollm2) == pytest.approx(2 * 9 * 64 / per_token)
    forest = packing.pack_trees(random_sequences(0, forests=1))[0]
    prompt, rows = len(forest[0].trees[0]), [len(t) for t in forest]
    one = prompt + sum(n - prompt for n in rows)
    even = (sum(rows) - one) / (one**2 - sum(n**2 for n in rows))  # kappa where the two cost the same
    assert packing.shares_its_prompt(forest, 0.9 * even) and not packing.shares_its_prompt(forest, 1.1 * even)
    assert not packing.shares_its_prompt(forest[:1], 0.0)  # a single tree has no copy to save
    sequences = random_sequences(3, keep=5, truncated_penalty=-1.0)  # those of the update test below
    shared = [packing.shares_its_prompt(f, 0.01) for f in packing.pack_trees(sequences)]
    assert any(shared) and not all(shared)


def test_a_forest_that_shares_its_prompt_is_one_row_with_the_prompt_once():
    sequences = random_sequences(seed=5, forests=3)
    layout = packing.TreeLayout(sequences, "token", 0, attention_cost=0.0)
    assert [len(g) for g in layout.groups] == [1, 1, 1] and all(u.one_row for u in layout.trees)
    rows = packing.layout_rows(layout.trees)
    assert [[(b, piece.tolist()) for b, piece in row] for row in rows] == [
        [(b, list(range(len(u))))] for b, u in enumerate(layout.trees)
    ]
    for unit in layout.trees:  # the row: the prompt, then every tree of the forest
        prompt, trees = unit.trees
        assert prompt.tolist() == list(range(len(prompt))) and len(trees) > 1


@pytest.mark.parametrize("packed", PACKED_LAYOUTS)
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_update_with_packing_takes_the_flat_step(model, tokenizer, aggregation, packed):
    """Two epochs of `treerl.update` in the flat and the packed layout (the second epoch with ratios
    away from 1), micro-batches of a few leaves, a KL to a perturbed reference: the packed layout
    ends at the same weights, with a row per tree or a forest's trees after one copy of the prompt."""
    sequences = random_sequences(3, keep=5, truncated_penalty=-1.0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    results = []
    for layout in (treerl.FlatLayout, PACKED_LAYOUTS[packed]):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        cfg = UpdateConfig(aggregation=aggregation, micro_batch_size=4, ppo_epochs=2, kl_coef=0.05)
        pad = tokenizer.pad_token_id
        stats = treerl.update(trained, optimizer, None, sequences, cfg, pad, ref_model=reference, layout=layout)
        results.append((stats, list(trained.parameters())))
    (flat_stats, flat_params), (packed_stats, packed_params) = results
    for key in ("loss", "clip_frac", "kl", "ratio", "grad_norm"):
        assert packed_stats[key] == pytest.approx(flat_stats[key], abs=ATOL), key
    assert flat_stats["clip_frac"] > 0
    assert 0 < packing.token_ratio(sequences) < 1
    for p, q in zip(packed_params, flat_params):
        torch.testing.assert_close(p, q, rtol=0, atol=ATOL)


def test_one_step_update_is_reinforce_on_the_token_advantages(model, tokenizer):
    """With one epoch and one mini-batch the old log-probs are the new ones detached (no extra
    forward): the step must be plain REINFORCE, -sum(A * log pi) / tokens, in both layouts."""
    sequences = random_sequences(2, keep=None, truncated_penalty=None)
    batch = logprobs.collate(sequences, tokenizer.pad_token_id)
    expected = copy.deepcopy(model)
    expected.train()
    logp = batch.logprobs(expected)
    (-(batch.advantages[..., 0] * logp * batch.mask).sum() / batch.mask.sum()).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p -= 0.5 * p.grad
    for layout in (treerl.FlatLayout, packing.TreeLayout):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        cfg = UpdateConfig(max_grad_norm=1e9)
        stats = treerl.update(trained, optimizer, None, sequences, cfg, tokenizer.pad_token_id, layout=layout)
        assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
        for p, q in zip(trained.parameters(), expected.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", [treerl.FlatLayout, packing.TreeLayout])
def test_gradient_parts_split_the_step_without_changing_it(model, tokenizer, layout):
    """--log_grad_parts: the KL term's gradient norm grows with its coefficient, the policy
    gradient's norm is the one of the same step without a KL, and the step itself is unchanged."""
    sequences = random_sequences(4, keep=5, truncated_penalty=-1.0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))

    def step(kl_coef, parts):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        cfg = UpdateConfig(micro_batch_size=4, kl_coef=kl_coef, log_grad_parts=parts)
        pad = tokenizer.pad_token_id
        stats = treerl.update(trained, optimizer, None, sequences, cfg, pad, ref_model=reference, layout=layout)
        return stats, list(trained.parameters())

    no_kl, _ = step(0.0, True)
    assert no_kl["kl_grad_norm"] == 0.0 and no_kl["pg_grad_norm"] == pytest.approx(no_kl["grad_norm"], rel=1e-5)
    logged, logged_params = step(0.05, True)
    plain, plain_params = step(0.05, False)
    assert "kl_grad_norm" not in plain
    for p, q in zip(logged_params, plain_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert logged["pg_grad_norm"] == pytest.approx(no_kl["pg_grad_norm"], rel=1e-4)
    doubled, _ = step(0.1, True)
    assert logged["kl_grad_norm"] > 0
    assert doubled["kl_grad_norm"] == pytest.approx(2 * logged["kl_grad_norm"], rel=1e-4)
