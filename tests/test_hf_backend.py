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
        draws = torch.stack([hf_backend.sample_top_p(probs.log(), top_p) for _ in range(4000)]).flatten()
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
