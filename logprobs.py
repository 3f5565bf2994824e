"""Per-token log-probs: of one distribution over the vocabulary, and of a batch of sequences.

Skip this file on a first reading. It holds the tensor helpers that the algorithm (treerl.py) shares
with the modules below it, which use them without importing the algorithm:

- `tempered_log_softmax`, `entropy` and `token_stats`: the log-probs of softmax(logits / T), the
  entropy of that distribution, and the log-prob of the token that was drawn: what a rollout
  engine records for every sampled token (hf_backend.py), and what the loss differentiates;
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
# A batch of sequences in the flat layout: one row per training sequence
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A micro-batch in the flat layout: right-padded sequences, one row per leaf.

    Every per-token tensor is aligned with the *targets* input_ids[:, 1:], so position t holds the
    quantities of the token predicted at step t; rows [B] and positions [W-1] are the same for the
    tensors the loss reads (`advantages`, `pairs`, `weight`) and the log-probs of `logprobs`.
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
        """log pi(target token) at every position, under softmax(logits / temperature): [B, W-1]."""
        logits = model(input_ids=self.input_ids, attention_mask=self.attention_mask).logits[:, :-1]
        return token_stats(logits, self.input_ids[:, 1:], temperature)[0]


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
