"""Tests for tree.py: the tree, EPTree with a fake sampler, and the process rewards of Eqs. 2-4."""

import math
import random

import pytest

import release
from tree import (
    Forkable,
    Node,
    Sample,
    chain_advantages,
    eptree_batch,
    generated_tokens,
    leaf_counts,
    leaves,
    outcome_advantages,
    path_tokens,
    process_rewards,
    response_tokens,
    select_forks,
    to_sequences,
    trees,
    values,
    walk,
)

EOS = 0


def eptree(prompt_ids, sample_fn, *args, **kwargs) -> Node:
    """EPTree (Algorithm 1) for one prompt: its forest as `eptree_batch` grows it in a batch of one."""
    return eptree_batch([prompt_ids], sample_fn, *args, **kwargs)[0]


# --------------------------------------------------------------------------------------------------
# A hand-computed forest: the paper's overview example
# --------------------------------------------------------------------------------------------------


def paper_forest():
    """5 leaves, 3 correct: V(root) = 3/5. Segment a has V = 1/2 and its child b has V = 1."""
    root = Node(tokens=[1, 2])
    a = root.add([10, 11])
    b = a.add([12])
    c = a.add([13])
    d = root.add([20])
    e = d.add([21])
    f = d.add([22])
    g = root.add([30])
    for leaf, r in ((b, 1.0), (c, 0.0), (e, 1.0), (f, 1.0), (g, 0.0)):
        leaf.reward = r
    return root, dict(a=a, b=b, c=c, d=d, e=e, f=f, g=g)


def test_paper_example_values_and_advantages():
    root, n = paper_forest()
    v = values(root)
    assert v[root] == pytest.approx(3 / 5)
    assert v[n["a"]] == pytest.approx(1 / 2)
    assert v[n["b"]] == 1.0 and v[n["d"]] == 1.0 and v[n["g"]] == 0.0
    # b: GA = 1 - 3/5 = 2/5 (Eq. 2), LA = 1 - 1/2 = 1/2 (Eq. 3), R = 9/10 over sqrt(1).
    r = process_rewards(root)
    assert r[n["b"]] == pytest.approx(2 / 5 + 1 / 2)
    # The rest, written out: c: -3/5 - 1/2; a: (-1/10 - 1/10)/sqrt 2; d: (2/5 + 2/5)/sqrt 2;
    # e, f: 2/5 + 0; g: -3/5 - 3/5.
    expected = {"c": -1.1, "a": -0.2 / math.sqrt(2), "d": 0.8 / math.sqrt(2), "e": 0.4, "f": 0.4, "g": -1.2}
    for name, value in expected.items():
        assert r[n[name]] == pytest.approx(value), name
    assert root not in r and len(r) == 7
    plain = process_rewards(root, reweight="none")
    assert plain[n["a"]] == pytest.approx(-0.2) and plain[n["d"]] == pytest.approx(0.8)
    # Ablations: one term at a time.
    assert process_rewards(root, use_local=False)[n["b"]] == pytest.approx(2 / 5)
    assert process_rewards(root, use_global=False)[n["b"]] == pytest.approx(1 / 2)


def test_leaf_without_reward_is_an_error():
    root = Node([1])
    root.add([2])
    root.add([3]).reward = 1.0
    with pytest.raises(ValueError, match="no reward"):
        values(root)


def test_bad_options_are_rejected():
    root, _ = paper_forest()
    with pytest.raises(ValueError, match="kind"):
        outcome_advantages([1.0, 0.0], kind="ppo")
    with pytest.raises(ValueError, match="one log-prob"):
        Node([1, 2], logprobs=[0.0])


# --------------------------------------------------------------------------------------------------
# Chains (L = 0) and the ChainRL baselines
# --------------------------------------------------------------------------------------------------


def chains(rewards):
    root = Node([7])
    for i, r in enumerate(rewards):
        root.add([100 + i, EOS], finished=True).reward = r
    return root


def test_unforked_chains_get_twice_the_centred_reward():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    root = chains(rewards)
    mean = sum(rewards) / len(rewards)
    r = process_rewards(root)
    for chain, reward in zip(trees(root), rewards):
        assert r[chain] == pytest.approx(2 * (reward - mean))


def test_all_equal_leaves_give_zero_rewards():
    root, _ = paper_forest()
    for leaf in leaves(root):
        leaf.reward = 1.0
    assert all(value == 0.0 for value in process_rewards(root).values())


def test_outcome_advantages():
    rewards = [1.0, 0.0, 0.0, 1.0]
    assert outcome_advantages(rewards, "drgrpo") == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # GRPO divides by the sample standard deviation (n - 1), as DeepSeek's and TRL's GRPO do:
    # sqrt((4 * 0.25) / 3) = 0.57735, so 0.5 / 0.57735 = 0.86603.
    assert outcome_advantages(rewards, "grpo") == pytest.approx(
        [0.8660254, -0.8660254, -0.8660254, 0.8660254], abs=1e-5
    )
    # RLOO: 1 - (1/3), 0 - (2/3)
    assert outcome_advantages(rewards, "rloo") == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # The release's ChainRL clamps negative RLOO advantages at -max A: with one right answer of
    # four, A = 1 - 0 = 1 for it and 0 - 1/3 for the others (above -1: unchanged); with three
    # right, the wrong one's -1 is raised to -max A = -(1 - 2/3) = -1/3.
    assert outcome_advantages([1.0, 0.0, 0.0, 0.0], "rloo", clamp=True) == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])
    assert outcome_advantages([1.0, 1.0, 1.0, 0.0], "rloo", clamp=True) == pytest.approx([1 / 3, 1 / 3, 1 / 3, -1 / 3])
    assert outcome_advantages([1.0, 1.0], "grpo") == [0.0, 0.0]
    root = chains(rewards)
    adv = chain_advantages(root, "drgrpo")
    assert [adv[c] for c in trees(root)] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    forked, _ = paper_forest()
    with pytest.raises(ValueError, match="unforked"):
        chain_advantages(forked)


# --------------------------------------------------------------------------------------------------
# Random forests (property tests)
# --------------------------------------------------------------------------------------------------


def random_forest(rng: random.Random, max_depth: int = 4) -> Node:
    root = Node([rng.randrange(50, 60) for _ in range(rng.randint(1, 4))])

    def grow(node, depth):
        for _ in range(rng.randint(1, 3) if depth < max_depth and rng.random() < 0.7 else 0):
            length = rng.randint(1, 5)
            child = node.add(
                [rng.randrange(1, 50) for _ in range(length)], logprobs=[-rng.random() for _ in range(length)]
            )
            grow(child, depth + 1)
        if node.is_leaf and node is not root:
            node.reward = float(rng.random() < 0.5)

    grow(root, 0)
    if root.is_leaf:
        root.add([1]).reward = 1.0
    return root


@pytest.mark.parametrize("seed", range(30))
def test_random_forest_properties(seed):
    root = random_forest(random.Random(seed))
    v, counts, r = values(root), leaf_counts(root), process_rewards(root)
    plain = process_rewards(root, reweight="none")
    for node in walk(root):
        if node.is_leaf:
            assert counts[node] == 1
            assert r[node] == pytest.approx(plain[node])  # one leaf under it: no re-weighting
        else:
            weighted = sum(counts[c] * v[c] for c in node.children) / counts[node]
            assert v[node] == pytest.approx(weighted)
            assert counts[node] == sum(counts[c] for c in node.children)
        if node is not root:
            assert r[node] == pytest.approx(plain[node] / math.sqrt(counts[node]))
    # Flattening reproduces every leaf's token path exactly, and every token carries R(segment).
    sequences = to_sequences(root, r)
    assert len(sequences) == len(leaves(root))
    for seq, leaf in zip(sequences, leaves(root)):
        assert seq.prompt_ids + seq.response_ids == path_tokens(leaf)
        assert seq.response_ids == response_tokens(leaf)
        assert len(seq.advantages) == len(seq.logprobs) == len(seq.response_ids)
        position = 0
        for segment in [n for n in reversed(list(_up(leaf))) if n is not root]:
            assert seq.advantages[position : position + len(segment.tokens)] == [r[segment]] * len(segment.tokens)
            position += len(segment.tokens)


def _up(node):
    while node is not None:
        yield node
        node = node.parent


def test_split_keeps_paths_and_children():
    root = Node([1])
    a = root.add([2, 3, 4, 5], logprobs=[-0.1, -0.2, -0.3, -0.4], entropies=[1, 2, 3, 4])
    b = a.add([6])
    b.reward = 1.0
    tail = a.split(2)
    assert a.tokens == [2, 3] and a.logprobs == [-0.1, -0.2] and a.entropies == [1, 2]
    assert tail.tokens == [4, 5] and tail.parent is a and a.children == [tail]
    assert tail.children == [b] and b.parent is tail
    assert path_tokens(b) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        a.split(0)


def test_subsampling_keeps_a_correct_leaf_and_truncation_penalty():
    root = Node([9])
    for i in range(10):
        leaf = root.add([i + 1, EOS], finished=(i != 3))
        leaf.reward = 1.0 if i == 7 else 0.0
    adv = process_rewards(root)
    for seed in range(20):
        kept = to_sequences(root, adv, keep=3, rng=random.Random(seed))
        assert len(kept) == 3 and any(s.reward == 1.0 for s in kept)
    penalised = to_sequences(root, adv, truncated_penalty=-1.0)
    assert penalised[3].advantages == [-1.0, -1.0] and not penalised[3].finished
    assert penalised[0].advantages == [adv[trees(root)[0]]] * 2


def test_the_tree_contract_of_the_design():
    """The tree API as the project's design states it, `scores=` for the entropies included."""
    root = Node(tokens=[1, 2])
    a = root.add([5, 6, 7], logprobs=[-0.1, -2.0, -0.5], scores=[0.3, 1.5, 0.2])
    assert a.entropies == [0.3, 1.5, 0.2] and a.logprobs == [-0.1, -2.0, -0.5] and a.parent is root
    b = a.add([8])
    c = a.add([9, 9])
    b.reward, c.reward = 1.0, 0.0
    assert leaves(root) == [b, c]
    assert values(root) == {root: 0.5, a: 0.5, b: 1.0, c: 0.0}
    assert process_rewards(root, reweight="none") == {a: 0.0, b: 1.0, c: -1.0}
    assert process_rewards(root)[b] == 1.0 and process_rewards(root)[a] == 0.0


def test_a_per_token_credit_reaches_the_sequences():
    """A segment's advantage may be one value per token instead of one for all (tree.to_sequences):
    each leaf's sequence then carries, token by token, the credit of the segments on its path."""
    root = Node([1])
    a = root.add([2, 3])
    b, c = a.add([4, EOS], finished=True), a.add([5], finished=True)
    b.reward, c.reward = 1.0, 0.0
    credit = {a: [0.5, -0.25], b: [1.0, 0.0], c: -1.0}  # lists for a and b, one number for c
    first, second = to_sequences(root, credit)
    assert first.advantages == [0.5, -0.25, 1.0, 0.0] and second.advantages == [0.5, -0.25, -1.0]
    with pytest.raises(ValueError, match="one value per token"):
        to_sequences(root, {**credit, a: [0.5]})


# --------------------------------------------------------------------------------------------------
# EPTree with a fake, deterministic sampler
# --------------------------------------------------------------------------------------------------


class FakeSampler:
    """Deterministic continuations: `length` tokens, the last one EOS, scores from a hash of the
    prefix so that different positions have different entropies. Records every call."""

    def __init__(self, length=12, answer_marker=None):
        self.length, self.answer_marker, self.calls, self.budgets = length, answer_marker, [], []

    def __call__(self, prefixes, n, budgets=None):
        # The budgets are recorded, not obeyed: eptree must cut what overshoots them.
        self.calls.append(([list(p) for p in prefixes], n))
        self.budgets.append(budgets)
        out = []
        for p in prefixes:
            group = []
            for j in range(n):
                rng = random.Random(hash((tuple(p), j)))
                tokens = [rng.randrange(1, 40) for _ in range(self.length - 1)] + [EOS]
                if self.answer_marker is not None:
                    tokens[-3] = self.answer_marker
                group.append(
                    Sample(tokens, [-rng.random() * 3 for _ in tokens], [rng.random() for _ in tokens], finished=True)
                )
            out.append(group)
        return out


@pytest.mark.parametrize("M,N,L,T", [(1, 1, 1, 1), (2, 3, 2, 2), (4, 2, 1, 3), (3, 0, 2, 2), (2, 2, 0, 2)])
def test_leaf_count_formula(M, N, L, T):
    sampler = FakeSampler(length=30)
    root = eptree([5, 6, 7], sampler, M=M, N=N, L=L, T=T)
    assert len(trees(root)) == M
    assert len(leaves(root)) == M * (1 + L * N * T)
    # One batched call for the chains, then one per round.
    assert len(sampler.calls) == (1 + L if N and T else 1)
    assert sampler.calls[0] == ([[5, 6, 7]], M)
    assert all(b is None for b in sampler.budgets)  # no response limit set: the sampler's own
    # Every generated token lives in exactly one segment.
    produced = sum(n * 30 for prefixes, n in sampler.calls for _ in prefixes)
    assert generated_tokens(root) == produced
    for leaf in leaves(root):
        assert len(response_tokens(leaf)) >= 30 and leaf.finished


def test_prefixes_end_strictly_before_the_forked_token():
    sampler = FakeSampler(length=20)
    root = Node([5, 6])
    # Use eptree's pieces by hand: pick the forks, then check what eptree sends for them.
    grown = eptree([5, 6], sampler, M=2, N=3, L=1, T=2, fork_score="nll")
    chains_before = sampler.calls[0]
    prefixes, n = sampler.calls[1]
    assert n == 2 and len(prefixes) == 6
    # Replay the first chain sampled, then re-select its top-3 nll tokens on an unforked copy.
    first = FakeSampler(length=20)([[5, 6]], 2)[0]
    for sample in first:
        root.add(sample.tokens, sample.logprobs, sample.entropies, finished=True)
    expected = []
    for top in trees(root):
        for fork in select_forks(top, 3, "nll", random.Random(0), Forkable()):
            expected.append([5, 6] + top.tokens[: fork.index])
            # The forked token is not part of its prefix and the prefix is a strict prefix.
            assert len(expected[-1]) == 2 + fork.index
    assert prefixes == expected
    assert chains_before == ([[5, 6]], 2)
    assert len(leaves(grown)) == 2 * (1 + 3 * 2)


def test_exclusions_first_token_eos_tail_answer_and_no_double_fork():
    MARK = 99
    answer_start = lambda response: response.index(MARK) if MARK in response else None  # noqa: E731
    sampler = FakeSampler(length=16, answer_marker=MARK)
    # Entropy scores: under the NLL scores of this fake sampler a branch may happen to re-sample
    # the token it was forked at, which repeats a prefix at a new place and would fool the
    # same-prefix check below (fork.index > 0 covers the rule itself for every score).
    root = eptree([1, 2], sampler, 2, 4, 3, 2, "entropy", Forkable(2, answer_start))
    seen = set()
    for prefixes, _ in sampler.calls[1:]:
        for p in prefixes:
            response = p[2:]
            # Never a branch's first token: the prefix is never the prompt itself.
            assert len(response) >= 1
            # Never at or after the answer marker (it sits 3 tokens from the end: ... MARK x EOS).
            assert MARK not in response
            # Never the same place twice.
            assert tuple(p) not in seen
            seen.add(tuple(p))
    for top in trees(root):
        for fork in Forkable(2, answer_start)(top):
            assert fork.index > 0
            assert fork.node.tokens[fork.index] not in (EOS, MARK)


def test_few_eligible_tokens_fork_less():
    sampler = FakeSampler(length=4)
    # Response of 4 tokens with skip_last=2: only offsets 1 is eligible (0 is a first token).
    root = eptree([3], sampler, M=2, N=5, L=1, T=3, candidates=Forkable(2))
    assert len(sampler.calls[1][0]) == 2  # one fork per tree
    assert len(leaves(root)) == 2 + 2 * 3


def test_per_tree_top_n_by_entropy():
    root = Node([1])
    scores_a = [0.0, 9.0, 1.0, 8.0, 2.0, 0.5, 0.1, 0.1]
    scores_b = [0.0, 0.2, 0.3, 0.1, 0.4, 0.5, 0.1, 0.1]
    a = root.add(list(range(10, 18)), entropies=scores_a, finished=True)
    b = root.add(list(range(20, 28)), entropies=scores_b, finished=True)
    rng = random.Random(0)
    picked_a = select_forks(a, 2, "entropy", rng, Forkable(2))
    picked_b = select_forks(b, 2, "entropy", rng, Forkable(2))
    # Top-2 within each tree, even though every score of tree b is lower than tree a's top two.
    assert [f.index for f in picked_a] == [1, 3]
    assert [f.index for f in picked_b] == [5, 4]


def test_random_fork_score_is_reproducible_with_a_seed():
    def grow(seed):
        sampler = FakeSampler(length=25)
        eptree([4], sampler, M=3, N=2, L=2, T=2, fork_score="random", seed=seed)
        return sampler.calls

    assert grow(1) == grow(1)
    assert grow(1) != grow(2)


def test_batched_search_equals_one_prompt_at_a_time():
    prompts = [[3, 4], [5], [6, 7, 8]]
    together = FakeSampler(length=18)
    forests = eptree_batch(prompts, together, M=2, N=2, L=2, T=2, seed=3)
    assert len(together.calls) == 3  # chains for every prompt in one call, then one per round
    for prompt, forest in zip(prompts, forests):
        alone = eptree(prompt, FakeSampler(length=18), M=2, N=2, L=2, T=2, seed=3)
        assert [path_tokens(leaf) for leaf in leaves(forest)] == [path_tokens(leaf) for leaf in leaves(alone)]


def test_response_budget_counts_the_prefix_before_a_fork():
    sampler = FakeSampler(length=20)
    root = eptree([1, 2, 3], sampler, M=2, N=2, L=2, T=2, max_response_tokens=15)
    # The sampler is told each branch's budget: what the response limit leaves below the fork.
    assert sampler.budgets[0] == [15]
    for (prefixes, _), budgets in zip(sampler.calls[1:], sampler.budgets[1:]):
        assert budgets == [15 - (len(p) - 3) for p in prefixes] and min(budgets) >= 1
    for leaf in leaves(root):
        assert len(response_tokens(leaf)) <= 15
        assert not leaf.finished  # every fake response (20 tokens) had to be cut
    assert len(leaves(root)) == 2 * (1 + 2 * 2 * 2)


# --------------------------------------------------------------------------------------------------
# The release's variants, each on its own (the whole preset is checked in test_release.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reweight", ["sqrt", "none"])
def test_the_release_variants_switched_off_are_the_paper(reweight):
    root, _ = paper_forest()
    assert release.process_rewards(root, reweight=reweight) == pytest.approx(process_rewards(root, reweight))


def test_leave_one_out_values_centre_each_leaf_on_the_others():
    root, n = paper_forest()
    v = release.leave_one_out_values(root)
    # 5 leaves, S = 3 correct: r' = r - (S - r) / 4, i.e. 1 - 2/4 = 1/2 and 0 - 3/4 = -3/4.
    assert v[n["b"]] == pytest.approx(0.5) and v[n["c"]] == pytest.approx(-0.75)
    assert v[n["a"]] == pytest.approx((0.5 - 0.75) / 2) and v[root] == pytest.approx(0.0)


def test_fill_in_paths_replaces_a_zero_local_advantage_with_the_one_above():
    root, n = paper_forest()
    # d and its leaves e, f all have V = 1, so LA(e) = LA(f) = 0; filled, they take LA(d) = 2/5.
    plain = process_rewards(root, reweight="none")
    filled = release.process_rewards(root, reweight="none", fill_in_paths=True)
    assert plain[n["e"]] == pytest.approx(2 / 5)  # GA only
    assert filled[n["e"]] == pytest.approx(2 / 5 + 2 / 5)  # GA + LA(d)
    # Directly under the prompt nothing is filled, and non-zero local advantages stay as they are.
    assert filled[n["d"]] == plain[n["d"]] and filled[n["b"]] == plain[n["b"]]


def test_release_reweight_divides_each_value_by_its_kept_leaves():
    root, n = paper_forest()
    kept = [n["b"], n["e"], n["g"]]  # c and f are not trained
    r = release.process_rewards(root, kept, reweight="release")
    W = {
        "a": (1 / 2) / math.sqrt(1),
        "b": 1.0,
        "d": 1 / math.sqrt(1),
        "e": 1.0,
        "g": 0.0,
        "root": (3 / 5) / math.sqrt(3),
    }
    # GA = W(s) - W(root), LA = W(s) - W(parent).
    assert r[n["b"]] == pytest.approx((W["b"] - W["root"]) + (W["b"] - W["a"]))
    assert r[n["a"]] == pytest.approx(2 * (W["a"] - W["root"]))
    assert r[n["e"]] == pytest.approx((W["e"] - W["root"]) + (W["e"] - W["d"]))
    assert r[n["c"]] == 0.0 and r[n["f"]] == 0.0  # no kept leaf below: not trained, 0


def test_release_fork_exclusions():
    root = Node([1, 2])
    top = root.add([5, 6, 7, 8, 9, EOS], logprobs=[-1.0] * 6, entropies=[0.5] * 6)
    top.reward = 0.0
    everything = [f.index for f in release.StopWordForks()(top)]
    assert everything == [1, 2, 3, 4, 5]  # EOS and the tail eligible; the first token never
    default = [f.index for f in Forkable(2)(top)]
    assert default == [1, 2, 3]  # the last 2 (EOS included) are not
    # In each segment, tokens after the first one whose text names the answer are not forked.
    stop_at_7 = lambda tokens: tokens.index(7) if 7 in tokens else None  # noqa: E731
    assert [f.index for f in release.StopWordForks(stop_at_7)(top)] == [1, 2]


def test_full_length_branches_get_the_whole_budget():
    sampler = FakeSampler(length=6)
    eptree_batch([[3]], sampler, 1, 1, 1, 2, candidates=Forkable(1), max_response_tokens=6, full_length_branches=True)
    assert sampler.budgets[1] == [6]
    sampler = FakeSampler(length=6)
    eptree_batch([[3]], sampler, 1, 1, 1, 2, candidates=Forkable(1), max_response_tokens=6)
    assert sampler.budgets[1][0] < 6  # what the response budget leaves below the fork
