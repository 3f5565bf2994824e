"""Tests for hf_backend.py: the transformers decode loop's log-probs, entropies, budgets, prefix
store and sampling."""

import math

import pytest
import torch
from conftest import EOS, PAD, VOCAB  # the tiny_model fixture is there too

import hf_backend
import logprobs
import tree
from hf_backend import HFBackend


def test_backend_log_probs_match_a_fresh_forward_pass(tiny_model):
    backend = HFBackend(tiny_model, EOS, PAD, batch_size=4)
    prefixes = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    torch.manual_seed(1)
    groups = backend.sample(prefixes, 2, max_new_tokens=12)
    assert [len(g) for g in groups] == [2, 2, 2]
    sequences = []
    for prefix, group in zip(prefixes, groups):
        for s in group:
            assert 1 <= len(s.tokens) <= 12 and len(s.logprobs) == len(s.entropies) == len(s.tokens)
            assert s.finished == (s.tokens[-1] == EOS) and EOS not in s.tokens[:-1]
            assert all(0 <= e <= math.log(VOCAB) + 1e-4 for e in s.entropies)
            sequences.append(
                tree.TrainSequence(prefix, s.tokens, s.logprobs, [0.0] * len(s.tokens), 0.0, s.finished, None)
            )
    batch = logprobs.collate(sequences, PAD)
    with torch.no_grad():
        recomputed = batch.logprobs(tiny_model)
    for row, seq in enumerate(sequences):
        got = recomputed[row][batch.mask[row].bool()]
        assert got.tolist() == pytest.approx(seq.logprobs, abs=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_backend_entropies_and_log_probs_are_of_the_tempered_distribution(tiny_model, temperature):
    backend = HFBackend(tiny_model, EOS, PAD, batch_size=8)
    torch.manual_seed(2)
    sample = backend.sample([[5, 6, 7]], 1, max_new_tokens=10, temperature=temperature)[0][0]
    ids = torch.tensor([[5, 6, 7] + sample.tokens])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, 2:-1]  # the logits that predicted each sampled token
    logp, ent = logprobs.token_stats(logits, ids[0, 3:], temperature)
    assert sample.logprobs == pytest.approx(logp.tolist(), abs=1e-4)
    assert sample.entropies == pytest.approx(ent.tolist(), abs=1e-4)


def test_backend_keeps_each_prefix_to_its_own_budget(tiny_model):
    """Prefixes of different lengths and budgets in one batch: rows leave the batch at different
    steps (the KV cache is compacted and its common left padding dropped), and every sample still
    has the log-probs of a fresh forward pass."""
    backend = HFBackend(tiny_model, EOS, PAD, batch_size=64)
    prefixes = [[5, 6, 7, 8, 9, 10, 11, 12], [8, 9], [10, 11, 12], [13, 14, 15, 16, 17], [4]]
    budgets = [2, 9, 5, 1, 14]
    torch.manual_seed(3)
    groups = backend.sample(prefixes, 3, budgets)
    sequences = []
    for prefix, budget, group in zip(prefixes, budgets, groups):
        assert len(group) == 3
        for s in group:
            assert 1 <= len(s.tokens) <= budget
            assert s.finished == (s.tokens[-1] == EOS)
            if not s.finished:
                assert len(s.tokens) == budget  # only EOS or the budget ends a sample
            sequences.append(
                tree.TrainSequence(prefix, s.tokens, s.logprobs, [0.0] * len(s.tokens), 0.0, s.finished, None)
            )
    batch = logprobs.collate(sequences, PAD)
    with torch.no_grad():
        recomputed = batch.logprobs(tiny_model)
    for row, seq in enumerate(sequences):
        assert recomputed[row][batch.mask[row].bool()].tolist() == pytest.approx(seq.logprobs, abs=1e-4)
    with pytest.raises(ValueError, match="budgets for 5 prefixes"):
        backend.sample(prefixes, 1, [4, 4])
    with pytest.raises(ValueError, match="positive integers"):
        backend.sample(prefixes, 1, [4, 4, 0, 4, 4])


def test_forks_resume_from_the_stored_states_of_their_prefix(tiny_model):
    """Inside reusing_prefixes(), a prefix that extends an earlier sample starts from that
    sample's KV states: nothing of it but its last token is recomputed, and the continuations are
    what a full prefill gives (greedy tokens equal, log-probs those of a fresh forward pass)."""
    backend = HFBackend(tiny_model, EOS, PAD, batch_size=64)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    assert backend.reuse_prefixes  # on by default for a model on a CPU
    with backend.reusing_prefixes():
        torch.manual_seed(4)
        chains = backend.sample(prompts, 2, 12, temperature=1.3)
        assert backend.stats["cached_prompt_tokens"] == 0
        forks = [
            prompt + s.tokens[:k]
            for prompt, group in zip(prompts, chains)
            for s in group
            for k in (2, 5)
            if len(s.tokens) > k
        ]
        assert forks, "the tiny model should sample chains longer than 5 tokens"
        before = dict(backend.stats)
        resumed = backend.sample(forks, 2, 6, temperature=0.0)
        assert backend.stats["cached_prompt_tokens"] - before["cached_prompt_tokens"] == sum(len(f) - 1 for f in forks)
    assert backend.prefix_store is None  # states are dropped when the block ends
    off = HFBackend(tiny_model, EOS, PAD, reuse_prefixes=False)
    with off.reusing_prefixes():  # switched off: every prefix is run again
        off.sample(prompts, 2, 12)
        off.sample(forks, 1, 2)
        assert off.stats["cached_prompt_tokens"] == 0
    with backend.reusing_prefixes(max_bytes=0):  # no room: every prefix is run again
        backend.sample(prompts, 2, 12)
        before = dict(backend.stats)
        backend.sample(forks, 1, 2)
        assert backend.stats["cached_prompt_tokens"] == before["cached_prompt_tokens"]
    prefilled = backend.sample(forks, 2, 6, temperature=0.0)
    assert [[s.tokens for s in g] for g in resumed] == [[s.tokens for s in g] for g in prefilled]
    for got, want in zip(resumed, prefilled):
        for a, b in zip(got, want):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert a.entropies == pytest.approx(b.entropies, abs=1e-5)


def test_with_calls_only_the_first_sampling_calls_keep_their_states(tiny_model):
    """reusing_prefixes(calls=1), as a search of one round opens it: the chains keep their states
    and the forks start from them, but the forks' own states are not kept (no later call of the
    search starts inside them), so a prefix that extends a fork is run through the model again."""
    backend = HFBackend(tiny_model, EOS, PAD, batch_size=64)
    prompt = [5, 6, 7]
    with backend.reusing_prefixes(calls=1):
        torch.manual_seed(4)
        [chains] = backend.sample([prompt], 2, 12, temperature=1.3)
        fork = prompt + chains[0].tokens[:2]
        before = backend.stats["cached_prompt_tokens"]
        [branches] = backend.sample([fork], 2, 6, temperature=1.3)
        assert backend.stats["cached_prompt_tokens"] - before == len(fork) - 1
        entries = len(backend.prefix_store.entries)
        deeper = fork + branches[0].tokens[:3]
        before = backend.stats["cached_prompt_tokens"]
        backend.sample([deeper], 1, 2)
        assert len(backend.prefix_store.entries) == entries  # nothing kept after the first call
        # Found, at most, as far as the chain it extends: never inside the branch.
        assert backend.stats["cached_prompt_tokens"] - before <= len(fork)


def test_prefix_store_finds_any_entry_that_starts_with_the_prefix():
    # A snapshot of two rows [layers=1, 2, rows=2, heads=1, columns=5, dim=1]: row 0 holds its
    # tokens from column 1 on (one column of left padding), row 1 from column 0; each column's
    # value is 10 * row + column, so what comes back says where it was read.
    snapshot = (10 * torch.arange(2).view(2, 1, 1) + torch.arange(5).view(1, 5, 1)).float()
    snapshot = snapshot.view(1, 1, 2, 1, 5, 1).expand(1, 2, 2, 1, 5, 1)
    store = hf_backend._PrefixStore(max_bytes=10**6)
    store.add(snapshot, [([1, 2, 3, 4], 1), ([1, 5], 0)])
    store.add(snapshot, [([2], 0)])
    assert store.find([1, 2]).states()[0, 0].flatten().tolist() == [1.0, 2.0]
    assert store.find([1, 5]).states()[0, 1].flatten().tolist() == [10.0, 11.0]
    assert store.find([1, 3]) is None and store.find([1, 2, 3, 4, 5]) is None and store.find([3]) is None
    assert not store.full() and hf_backend._PrefixStore(max_bytes=1).full() is False
    store.max_bytes = store.bytes
    assert store.full()


def test_top_p_draws_only_from_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.manual_seed(0)
    for top_p, support, first_share in ((0.7, {0, 1}, 0.5 / 0.8), (0.45, {0}, 1.0), (0.81, {0, 1, 2}, 0.5 / 0.95)):
        draws = torch.stack([hf_backend.sample_top_p(probs, top_p) for _ in range(4000)]).flatten()
        assert set(draws.tolist()) == support
        assert (draws == 0).float().mean().item() == pytest.approx(first_share, abs=0.03)


def test_greedy_sampling_is_deterministic(tiny_model):
    backend = HFBackend(tiny_model, EOS, PAD)
    a = backend.sample([[3, 4, 5]], 2, max_new_tokens=8, temperature=0.0)[0]
    b = backend.sample([[3, 4, 5]], 1, max_new_tokens=8, temperature=0.0)[0]
    assert a[0].tokens == a[1].tokens == b[0].tokens


def test_a_response_ends_at_any_of_several_stop_tokens(tiny_model):
    # A greedy response; then each of its tokens in turn is made a second stop token beside EOS:
    # the response ends at that token's first occurrence, finished.
    prompt = [3, 4, 5]
    [[free]] = HFBackend(tiny_model, EOS, PAD).sample([prompt], 1, max_new_tokens=8, temperature=0.0)
    for stop in set(free.tokens) - {EOS}:
        [[sample]] = HFBackend(tiny_model, [EOS, stop], PAD).sample([prompt], 1, max_new_tokens=8, temperature=0.0)
        assert sample.tokens == free.tokens[: free.tokens.index(stop) + 1] and sample.finished


def test_a_kv_cache_budget_caps_the_rows_of_a_decode_batch(tiny_model, monkeypatch):
    """With kv_cache_bytes, a decode batch holds as many rows as their KV caches (longest prefix +
    budget, each) fit in; a budget that never binds leaves the batches, and so the samples drawn
    for a seed, as without one."""
    per_token = hf_backend.kv_bytes_per_token(tiny_model)
    with torch.no_grad():  # what a cache really holds per token
        cache = tiny_model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 3 * per_token

    prefixes, budget = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], 6
    positions = max(map(len, prefixes)) + budget

    def draw(kv_cache_bytes):
        backend = HFBackend(tiny_model, EOS, PAD, batch_size=64, kv_cache_bytes=kv_cache_bytes)
        rows, generate = [], backend._generate
        monkeypatch.setattr(backend, "_generate", lambda p, n, *a: rows.append(len(p) * n) or generate(p, n, *a))
        torch.manual_seed(0)
        groups = backend.sample(prefixes, 2, budget)
        return rows, [[s.tokens for s in g] for g in groups]

    capped_rows, capped = draw(5 * positions * per_token)  # room for 5 rows: 2 prefixes x 2 per batch
    assert capped_rows == [4, 2] and [len(g) for g in capped] == [2, 2, 2]
    free_rows, free = draw(0)
    assert free_rows == [6] and draw(10**9) == (free_rows, free)


# --------------------------------------------------------------------------------------------------
# The sampler: the same distribution as torch.multinomial, by a chi-square test on a full vocabulary
# --------------------------------------------------------------------------------------------------

SMOLLM2_VOCAB = 49_152


def zipf_probs(vocab: int = SMOLLM2_VOCAB, zeros: int = 4096) -> torch.Tensor:
    """Probabilities [vocab] (float32) of a heavy-tailed next-token distribution, as a language
    model's: the token of rank r has probability proportional to (r + 2.7)^-1.1 (the top one about
    6%, more than a quarter of the mass beyond the 1,000 most likely), ranks scattered over the
    token ids, and `zeros` tokens of probability 0 (as a masked logit gives)."""
    generator = torch.Generator().manual_seed(0)
    weights = (torch.arange(vocab, dtype=torch.float64) + 2.7) ** -1.1
    weights[vocab - zeros :] = 0.0
    scattered = torch.empty_like(weights)
    scattered[torch.randperm(vocab, generator=generator)] = weights / weights.sum()
    return scattered.float()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor, min_expected: float = 20.0) -> tuple[float, float]:
    """Pearson's statistic of drawn `tokens` against the probabilities `probs` [V], and the value it
    exceeds with probability about 1e-6 if the draws do follow `probs` (Wilson-Hilferty's
    approximation of the chi-square quantile, z = 4.75). Tokens are binned in order of decreasing
    probability, a bin closing once it expects `min_expected` draws: the likely tokens get a bin
    each, the rare ones of the tail share bins, so the tail's mass is tested too. A draw of a token
    of probability 0 fails outright."""
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    order = probs.argsort(descending=True)
    expected = probs[order] * tokens.numel()
    positive = expected > 0
    expected, counts = expected[positive], counts[order][positive]
    bins = ((expected.cumsum(0) - expected) / min_expected).floor().long()
    bins = torch.minimum(bins, bins[-1] - 1)  # the last bin, short of min_expected, joins the one before
    expected, counts = torch.bincount(bins, expected), torch.bincount(bins, counts)
    present = expected > 0
    expected, counts = expected[present], counts[present]
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    df = len(expected) - 1
    critical = df * (1 - 2 / (9 * df) + 4.75 * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


DRAWS = 100_000


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [V] renormalised over their top-p nucleus (0 outside it), by the definition."""
    ranked, order = probs.sort(descending=True, stable=True)
    keep = (ranked.cumsum(0) - ranked) < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = ranked[keep] / ranked[keep].sum()
    return out


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_sampler_draws_a_full_vocabulary_distribution_with_its_tail(top_p):
    """100,000 draws from a 49,152-token heavy-tailed distribution fit it (chi-square over some
    5,000 bins, the tail's rare tokens binned together), as torch.multinomial's draws do; no token
    of probability 0, and with top_p < 1 no token outside the nucleus, is ever drawn."""
    probs = zipf_probs()
    want = nucleus(probs.double(), top_p)
    torch.manual_seed(0)
    drawn = hf_backend.sample_top_p(probs[None], top_p, samples=DRAWS)
    assert drawn.shape == (1, DRAWS)
    statistic, critical = chi_square(drawn, want)
    assert statistic < critical, (statistic, critical)
    reference = torch.multinomial(want, DRAWS, replacement=True)  # what the sampler replaced
    statistic, critical = chi_square(reference, want)
    assert statistic < critical, (statistic, critical)


WRONG_SAMPLERS = {
    # every token drawn with its neighbour's probability
    "off by one": lambda probs: (hf_backend.sample_top_p(probs, 1.0, DRAWS) + 1) % probs.shape[-1],
    # the tail beyond the 2,000 most likely tokens (about a fifth of the mass) never drawn
    "tail lost": lambda probs: hf_backend.sample_top_p(
        probs.masked_fill(probs < probs.topk(2000).values[:, -1:], 0.0), 1.0, DRAWS
    ),
    # a temperature 5% too low
    "biased": lambda probs: hf_backend.sample_top_p(torch.softmax(probs.log() / 0.95, -1), 1.0, DRAWS),
}


@pytest.mark.parametrize("wrong", WRONG_SAMPLERS)
def test_the_goodness_of_fit_test_rejects_a_wrong_sampler(wrong):
    """The test above can fail: a sampler that is off by one token, loses the tail or is biased
    fails it (or draws a token of probability 0, which fails at once)."""
    probs = zipf_probs()
    torch.manual_seed(0)
    drawn = WRONG_SAMPLERS[wrong](probs[None])
    try:
        statistic, critical = chi_square(drawn, probs.double())
    except AssertionError:
        return  # a token of probability 0 was drawn
    assert statistic > critical, (statistic, critical)


def test_the_sampler_never_draws_a_token_of_probability_zero_even_at_the_ends(monkeypatch):
    """The inverse CDF at its extremes: u = 0 draws the first token of positive probability, and
    the largest u below 1 the last one, with zero-probability tokens before, between and after."""
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.25, 0.25, 0.0, 0.0]])
    for u, token in ((0.0, 2), (1.0 - 2.0**-53, 5)):
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u, dtype=torch.float64))
        assert hf_backend.sample_top_p(probs, 1.0).item() == token
        assert hf_backend.sample_top_p(probs, 0.6).item() == (2 if u == 0.0 else 4)  # nucleus {2, 4}
    monkeypatch.undo()
    torch.manual_seed(0)
    drawn = hf_backend.sample_top_p(probs, 1.0, samples=20_000)
    assert set(drawn.flatten().tolist()) == {2, 4, 5}
    with pytest.raises(ValueError, match="all zero or not a number"):
        hf_backend.sample_top_p(torch.full((1, 4), math.nan), 1.0)


def test_top_p_with_tied_probabilities_keeps_the_lower_token_ids():
    """Tied tokens are ranked by token id: at the nucleus' edge the lower ids are kept, the same
    set at every draw, and the kept tokens are drawn in proportion to their probabilities."""
    probs = torch.tensor([[0.125, 0.25, 0.125, 0.25, 0.125, 0.125]])  # exact in binary
    torch.manual_seed(0)
    for top_p, want in (
        (0.25, {1: 1.0}),  # token 3 (tied with 1) has 0.25 before it: not < 0.25
        (0.3, {1: 0.5, 3: 0.5}),
        (0.55, {1: 0.4, 3: 0.4, 0: 0.2}),  # 0, 2, 4 and 5 tie; 0 comes first
        (0.7, {1: 1 / 3, 3: 1 / 3, 0: 1 / 6, 2: 1 / 6}),
    ):
        drawn = hf_backend.sample_top_p(probs, top_p, samples=20_000).flatten()
        assert set(drawn.tolist()) == set(want)
        for token, share in want.items():
            assert (drawn == token).double().mean().item() == pytest.approx(share, abs=0.015)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_backend_draws_from_the_tempered_distribution_and_its_nucleus(tiny_model, temperature):
    """The decode loop's first token, drawn 20,000 times through HFBackend, follows
    softmax(logits / temperature) (and not softmax(logits): the temperature changes the
    frequencies), and with top_p it stays inside the tempered distribution's nucleus."""
    backend = HFBackend(tiny_model, EOS, PAD)
    prefix = [5, 6, 7]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prefix])).logits[0, -1].double()
    tempered = torch.softmax(logits / temperature, -1)
    torch.manual_seed(0)
    for top_p in (1.0, 0.6):
        drawn = torch.tensor([s.tokens[0] for s in backend.sample([prefix], 20_000, 1, temperature, top_p)[0]])
        want = nucleus(tempered, top_p)
        statistic, critical = chi_square(drawn, want, min_expected=10)
        assert statistic < critical, (top_p, statistic, critical)
        if top_p < 1.0:
            assert set(drawn.tolist()) == set(want.nonzero().flatten().tolist())
    untempered, critical = chi_square(drawn, nucleus(torch.softmax(logits, -1), 0.6), min_expected=10)
    assert untempered > critical


def test_a_call_of_several_decode_batches_shows_a_progress_bar(tiny_model, capsys):
    """A bar on stderr for a call that takes more than one decode batch, such as a held-out
    evaluation; none for a call of one batch, such as most rollouts."""
    prefixes = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [7, 7]]
    groups = HFBackend(tiny_model, EOS, PAD, batch_size=8).sample(prefixes, 2, max_new_tokens=6)
    assert [len(g) for g in groups] == [2, 2, 2, 2] and "sampling" not in capsys.readouterr().err
    groups = HFBackend(tiny_model, EOS, PAD, batch_size=2).sample(prefixes, 2, max_new_tokens=6)
    assert [len(g) for g in groups] == [2, 2, 2, 2] and "sampling" in capsys.readouterr().err
