"""Tests for logprobs.py: the target tokens' log-probs, made in chunks from the last hidden states,
equal those of the model's full-vocabulary logits, and so do their gradients, in the flat and the
tree-packed layout, at a temperature other than 1, in one chunk or several.

Tolerances (float32): log-probs within 1e-5 absolute; each parameter's gradient within 1e-4 of its
largest entry. Only the order of floating-point sums differs.
"""

import copy

import pytest
import torch
from test_packing import pack_sequences, random_sequences

import logprobs
import packing
import treerl

LOGP_ATOL = 1e-5
GRAD_RTOL = 1e-4
TEMPERATURE = 0.7


def full_vocabulary_logprobs(batch, model, temperature: float) -> torch.Tensor:
    """The log-probs as they were made before: the model's logits over the whole vocabulary at every
    position, their log-softmax, the target's entry (at every position, scored or not)."""
    if isinstance(batch, packing.PackedBatch):
        inputs = dict(input_ids=batch.row_ids, attention_mask=batch.attention_mask, position_ids=batch.row_positions)
        logits = model(**inputs).logits.flatten(0, 1)[batch.predictor]
        return logprobs.token_stats(logits, batch.input_ids, temperature)[0]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return logprobs.token_stats(logits, batch.input_ids[:, 1:], temperature)[0]


def batch_in(layout: str, sequences, pad_token_id: int):
    if layout == "flat":
        return logprobs.collate(sequences, pad_token_id)
    return packing.collate_packed(pack_sequences(sequences), pad_token_id)


def logprobs_and_gradients(model, batch, logprobs_fn):
    """Log-probs of `batch` and the gradient of a clipped loss on them (ratios away from 1)."""
    model.zero_grad(set_to_none=True)
    logp = logprobs_fn()
    old = logp.detach() + 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    loss, _ = treerl.policy_loss(logp, old, batch, denominator=50.0)
    loss.backward()
    return logp.detach(), [p.grad.clone() for p in model.parameters()]


def assert_gradients_close(got, expected):
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= GRAD_RTOL * e.abs().max()
    assert max(e.abs().max().item() for e in expected) > 1e-4  # the comparison is not vacuous


@pytest.mark.parametrize("layout", ["flat", "packed"])
@pytest.mark.parametrize("chunk_rows", [None, 7])  # the whole batch in one chunk, or 7 positions per chunk
def test_chunked_log_probs_and_gradients_equal_the_full_vocabulary_ones(
    model, tokenizer, monkeypatch, layout, chunk_rows
):
    if chunk_rows:
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk_rows * model.config.vocab_size)
    model = copy.deepcopy(model)
    batch = batch_in(layout, random_sequences(2, truncated_penalty=-1.0), tokenizer.pad_token_id)
    scored = batch.pairs.sum(-1) > 0
    assert chunk_rows is None or scored.sum() > 3 * chunk_rows  # several chunks

    new, new_grads = logprobs_and_gradients(model, batch, lambda: batch.logprobs(model, TEMPERATURE))
    old, old_grads = logprobs_and_gradients(
        model, batch, lambda: full_vocabulary_logprobs(batch, model, TEMPERATURE) * scored
    )
    torch.testing.assert_close(new[scored], old[scored], rtol=0, atol=LOGP_ATOL)
    assert (new[~scored] == 0).all()  # prompt and padding are not scored
    assert_gradients_close(new_grads, old_grads)


def test_an_update_with_a_kl_reference_takes_the_full_vocabulary_step(model, tokenizer, monkeypatch):
    """`treerl.update` over two epochs of micro-batches, with a KL to a perturbed reference model,
    at temperature 0.7: the same weights as with the full-vocabulary log-probs, in both layouts."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)
    sequences = random_sequences(3, keep=5, truncated_penalty=-1.0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cfg = treerl.UpdateConfig(micro_batch_size=4, ppo_epochs=2, kl_coef=0.05)
    for layout, batch_class in ((treerl.FlatLayout, logprobs.Batch), (packing.TreeLayout, packing.PackedBatch)):
        weights = []
        for full_vocabulary in (False, True):
            if full_vocabulary:
                monkeypatch.setattr(batch_class, "logprobs", lambda b, m, t=1.0: full_vocabulary_logprobs(b, m, t))
            trained = copy.deepcopy(model)
            optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
            pad = tokenizer.pad_token_id
            stats = treerl.update(trained, optimizer, None, sequences, cfg, pad, TEMPERATURE, reference, layout=layout)
            assert stats["kl"] > 0 and stats["clip_frac"] > 0
            assert all(p.grad is None for p in trained.parameters())  # freed after the step
            weights.append(list(trained.parameters()))
        monkeypatch.undo()
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)
        for p, q in zip(*weights):
            torch.testing.assert_close(p, q, rtol=0, atol=LOGP_ATOL)


def test_no_scored_position_gives_an_empty_result(model, tokenizer):
    hidden = torch.zeros(0, model.config.hidden_size)
    empty = logprobs.target_logprobs(model, hidden, torch.zeros(0, dtype=torch.long), TEMPERATURE)
    assert empty.shape == (0,) and empty.dtype == torch.float32
