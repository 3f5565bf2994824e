"""Per-token log-probs: of one distribution over the vocabulary, and of a batch of sequences.

Skip this file on a first reading. It holds the tensor helpers that the algorithm (treerl.py) shares
with the modules below it, which use them without importing the algorithm:

- `tempered_log_softmax`, `entropy` and `token_stats`: the log-probs of softmax(logits / T), the
  entropy of that distribution, and the log-prob of the token that was drawn: what a rollout
  engine records for every sampled token (hf_backend.py);
- `hidden_states` and `target_logprobs`: the log-prob of given tokens alone, what the loss
  differentiates, computed from the model's last hidden states in chunks of positions, so that
  the full-vocabulary logits of the whole batch never exist at once and none is kept for the
  backward (the flat layout below, the tree-packed one, the warm start);
- `Batch` and `collate`: the flat layout, one right-padded row per training sequence, which
  `treerl.FlatLayout` hands to `treerl.policy_loss` and the supervised warm start
  (`policy.warm_start`) trains on;
- `aggregation_weight`: w, the weight of every token of a response in the loss (1 for token
  aggregation, 1 / length for sequence aggregation), used by the flat and the tree-packed layout
  (packing.py) alike. How the loss uses it: the comment above `treerl.clipped_surrogate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import tree

# --------------------------------------------------------------------------------------------------
# One distribution: log-probs, entropy, the drawn token's log-prob
# --------------------------------------------------------------------------------------------------


def token_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `tokens` and entropy of the distribution softmax(logits / temperature).

    Both are of the temperature-scaled distribution before top-p truncation, the distribution the
    policy gradient is taken on. logits: [..., V], tokens: [...] -> two tensors shaped like tokens.
    """
    logp = tempered_log_softmax(logits, temperature)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy(logp)


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution given by log-probs over the last dimension."""
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------------
# The log-probs of given tokens under a model, without a batch's full-vocabulary logits
# --------------------------------------------------------------------------------------------------

# Positions per chunk times vocabulary size: how many logits `target_logprobs` holds at once (a
# small vocabulary fits a whole batch in one chunk).
CHUNK_ELEMENTS = 2**24


def hidden_states(model, **inputs) -> torch.Tensor:
    """The last hidden states of a causal LM (its decoder without the output layer): [..., H].
    No KV cache is made (transformers would otherwise keep a copy of every layer's keys and values)."""
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def output_layer(model) -> torch.nn.Module:
    """The layer that maps a hidden state to logits (tied to the input embeddings in the tiny model
    and SmolLM2). Models whose logits are more than that layer's output are refused."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise NotImplementedError(f"{config.model_type}: logits rescaled after the output layer are not supported")
    return model.get_output_embeddings()


def target_logprobs(model, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature), logits = output layer(hidden), for the
    rows of hidden [N, H] and tokens [N]: [N], float32.

    Only the target token's log-prob is needed, not the distribution: the logits are made chunk of
    positions by chunk (at most CHUNK_ELEMENTS of them at a time), and when a gradient is needed
    each chunk runs under torch.utils.checkpoint, which keeps only its inputs and makes its logits
    again in the backward. (TRL's selective_log_softmax is the same idea without the output layer.)
    """
    head = output_layer(model)
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tempered_log_softmax(head(h), temperature).gather(-1, t[:, None]).squeeze(-1)

    parts = []
    for start in range(0, len(tokens), rows):
        h, t = hidden[start : start + rows], tokens[start : start + rows]
        parts.append(checkpoint(chunk, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# A batch of sequences in the flat layout: one row per training sequence
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A micro-batch in the flat layout: right-padded sequences, one row per leaf.

    Every per-token tensor is aligned with the *targets* input_ids[:, 1:], so position t holds the
    quantities of the token predicted at step t; rows [B] and positions [W-1] are the same for the
    tensors the loss reads (`advantages`, `pairs`, `weight`) and the log-probs of `logprobs`.
    Only response tokens are scored: prompt and padding positions carry no weight in any loss.
    """

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    advantages: torch.Tensor  # [B, W-1, 1] w * A on response tokens, 0 elsewhere
    pairs: torch.Tensor  # [B, W-1, 1] (leaf, token) pairs behind each column: 1 on response tokens
    weight: torch.Tensor  # [B, W-1] w on response tokens (the weight of the KL term)

    @property
    def mask(self) -> torch.Tensor:
        """[B, W-1] 1 on response tokens."""
        return self.pairs[..., 0]

    def logprobs(self, model, temperature: float = 1.0) -> torch.Tensor:
        """log pi(target token) under softmax(logits / temperature) at every response position, 0
        elsewhere: [B, W-1]."""
        scored = self.mask.bool()
        hidden = hidden_states(model, input_ids=self.input_ids, attention_mask=self.attention_mask)
        logp = target_logprobs(model, hidden[:, :-1][scored], self.input_ids[:, 1:][scored], temperature)
        return torch.zeros(scored.shape, device=logp.device).masked_scatter(scored, logp)


def aggregation_weight(response_length: int, aggregation: str) -> float:
    """w of every token of a response: 1 for token aggregation, 1 / length for sequence aggregation."""
    return 1.0 if aggregation == "token" else 1.0 / max(response_length, 1)


def collate(
    sequences: Sequence[tree.TrainSequence], pad_token_id: int, aggregation: str = "token", device="cpu"
) -> Batch:
    """`sequences` in the flat layout: one row each, prompt and response, right-padded with
    `pad_token_id`; every response token weighted by `aggregation` ("token" or "sequence")."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width - 1))
    advantages = torch.zeros((len(sequences), width - 1))
    weight = torch.zeros((len(sequences), width - 1))
    for row, s in enumerate(sequences):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[row, : p + r] = 1
        # Response token j sits at input position p + j and is predicted from position p + j - 1.
        w = aggregation_weight(r, aggregation)
        mask[row, p - 1 : p + r - 1] = 1
        weight[row, p - 1 : p + r - 1] = w
        advantages[row, p - 1 : p + r - 1] = w * torch.tensor(s.advantages)
    tensors = (ids, attention, advantages[..., None], mask[..., None], weight)
    return Batch(*(t.to(device) for t in tensors))
