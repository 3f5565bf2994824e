"""TreeRL's training machinery: rollouts with EPTree, process rewards, and the policy update.

One TreeRL step (Section 3 of Hou et al., 2025) is

    prompts ──► rollout: EPTree forests (tree.eptree_batch) sampled by a backend
            ──► verifier rewards on every leaf (rewards.py), 0 for a response that never ended
            ──► per-token advantages: R(s) of Eqs. 2-4 for TreeRL, or an outcome advantage
                (GRPO / Dr. GRPO / RLOO) for ChainRL, which is the same rollout with L = 0
            ──► update: a clipped policy-gradient loss on those advantages (GRPO-style, with the
                asymmetric clip of DAPO), then backend.sync(model); with --pack_tree each token
                of a forest goes through the model once (a row per tree, packing.py), same loss

The rollout backend is the only part that touches a generation engine. It has one job: given
token-id prefixes, return sampled continuations with each token's log-prob and the entropy of the
distribution it was drawn from (the fork score of EPTree). `HFBackend` does it with a KV-cache
decode loop over the transformers model being trained, `VLLMBackend` with a colocated vLLM engine
(prefix cache, in-place weight sync); any engine with the same two methods (`sample`, `sync`)
plugs in.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

import packing
import tree
from tree import Sample

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Rollout backends
# --------------------------------------------------------------------------------------------------


class Backend(Protocol):
    """What the rollout needs from a generation engine.

    An engine that keeps its own copy of the weights may also have `sleep()`, to free its memory
    before the update (train.py calls it when present; `sync` brings the engine back), and
    `close()`, to shut it down at the end of a run (VLLMBackend has both).
    """

    def sample(self, prefixes: list[list[int]], n: int, max_new_tokens: int | Sequence[int],
               temperature: float = 1.0, top_p: float = 1.0) -> list[list[Sample]]:
        """For each prefix, n independent continuations (EOS included as last token when one was
        produced), each token's log-prob and the entropy of its sampling distribution.
        `max_new_tokens` is one limit for all prefixes or one per prefix (a fork's branches may
        only fill what the response budget leaves below the fork)."""

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (called after every update)."""


def token_stats(logits: torch.Tensor, tokens: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
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


class HFBackend:
    """Sampling from the model being trained with a batched KV-cache decode loop of its own.

    It samples from the very model being trained (no copy), so `sync` has nothing to do. The loop
    is written out here rather than left to transformers' `generate` because a tree search asks
    more of it than a chain sampler does:

    - **One prefill per prefix.** The n continuations of a prefix share its forward pass: the
      prefix is run once and its KV cache copied n times (EPTree's T branches per fork, and the M
      chains per prompt).
    - **No prefill at all for a fork, inside `reusing_prefixes()`.** A fork's prefix is the start
      of a response sampled earlier in the same search, so its keys and values were computed
      then. In that block every sampled row's KV states are kept, and a later prefix that extends
      one of them starts from a copy (only its last token is run, for the next-token logits).
      This pays on a CPU, where reading a prefix costs about what generating it did, and not on a
      GPU, where a prefill is a few decode steps' time and keeping and copying states costs more
      (eval/throughput.py, README "Performance"); so by default it is on for a model on a CPU.
    - **A budget per prefix.** A fork's branches may only fill what is left of the response budget
      below the fork, which differs from prefix to prefix (`max_new_tokens` may be a list).
    - **Finished rows leave the batch.** A row stops at EOS or at its budget; the batch is
      compacted (rows dropped from the KV cache) once an eighth of it has stopped, so short and
      long continuations share a batch without the short ones being computed to the longest's end.

    Each token's log-prob and entropy come from the step's logits, which the loop has anyway, so
    memory stays one [batch, vocab] tensor however long the responses.
    """

    COMPACT_FRACTION = 1 / 8  # drop stopped rows once they are this share of the batch

    def __init__(self, model, eos_token_id: int, pad_token_id: int, batch_size: int = 256,
                 reuse_prefixes: bool | None = None):
        self.model, self.eos, self.pad, self.batch_size = model, eos_token_id, pad_token_id, batch_size
        if reuse_prefixes is None:  # see the class docstring
            reuse_prefixes = next(model.parameters()).device.type == "cpu"
        self.reuse_prefixes = reuse_prefixes
        self.prefix_store: _PrefixStore | None = None  # set inside reusing_prefixes()
        # Prefix tokens asked for (once per prefix, not per continuation) and those whose KV
        # states came from the store instead of a forward pass.
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0}

    def sync(self, model) -> None:
        self.model = model

    @contextlib.contextmanager
    def reusing_prefixes(self, max_bytes: int = 4 * 2**30):
        """Within the block, keep the KV states of every sampled row (up to `max_bytes` of them)
        and start later prefixes that extend one of them from those states. For one search: the
        weights must not change inside the block (the states would be stale), and the states are
        dropped when it ends. (A 1.5B model's states take 28 KiB per token: 4 GiB hold about 150k
        tokens, the M chains of 16 prompts at 1.5k tokens each.) Does nothing when the backend was
        made with reuse_prefixes=False."""
        self.prefix_store = _PrefixStore(max_bytes if self.reuse_prefixes else 0)
        try:
            yield self
        finally:
            self.prefix_store = None

    @torch.no_grad()
    def sample(self, prefixes, n, max_new_tokens, temperature=1.0, top_p=1.0):
        budgets = _per_prefix(max_new_tokens, len(prefixes))
        if any(not p for p in prefixes):
            raise ValueError("HFBackend.sample: every prefix needs at least one token")
        # KV states already computed for all but the last token of each prefix, where kept.
        stored = [self.prefix_store.find(p[:-1]) if self.prefix_store and len(p) > 1 else None
                  for p in prefixes]
        self.stats["prompt_tokens"] += sum(map(len, prefixes))
        self.stats["cached_prompt_tokens"] += sum(s.count for s in stored if s is not None)
        # A batch is all resumed or all prefilled; prefixes with similar budgets share a batch
        # (`batch_size` rows = prefixes x n).
        order = sorted(range(len(prefixes)), key=lambda k: (stored[k] is None, -budgets[k]))
        per_batch = max(1, self.batch_size // n)
        groups: list[list[Sample]] = [[] for _ in prefixes]
        was_training = self.model.training
        self.model.eval()
        try:
            start = 0
            while start < len(order):
                resumed = stored[order[start]] is not None
                chunk = [k for k in order[start:start + per_batch] if (stored[k] is not None) == resumed]
                start += len(chunk)
                samples = self._generate([list(prefixes[k]) for k in chunk], n, [budgets[k] for k in chunk],
                                         temperature, top_p, [stored[k] for k in chunk] if resumed else None)
                for j, k in enumerate(chunk):
                    groups[k] = samples[j * n:(j + 1) * n]
        finally:
            self.model.train(was_training)
        return groups

    def _start(self, prefixes, capacity: int, stored):
        """The KV cache after every prefix (rows left-padded to the longest), the next-token
        logits of each, its attention mask and the position of the next token.

        Without stored states the prefixes are run whole (prefill). With them, the cache is filled
        from the stored states of all but each prefix's last token, and only the last tokens run.
        """
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prefixes)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = preallocated_kv_cache(self.model, capacity)
        if stored is None:
            input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prefixes], device=device)
        else:
            _load_states(cache, stored, width - 1)
            input_ids = torch.tensor([[p[-1]] for p in prefixes], device=device)
            positions = positions[:, -1:]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1], mask, positions[:, -1] + 1

    def _generate(self, prefixes, n, budgets, temperature, top_p, stored=None) -> list[Sample]:
        """n continuations of each prefix (rows prefix-major), each at most its prefix's budget."""
        device = next(self.model.parameters()).device
        cache, logits, mask, position = self._start(prefixes, max(map(len, prefixes)) + max(budgets), stored)
        # The n rows of a prefix start from copies of its cache and its last logits.
        cache.batch_repeat_interleave(n)
        logits, mask, position = (t.repeat_interleave(n, 0) for t in (logits, mask, position))
        budget = torch.tensor(budgets, device=device).repeat_interleave(n, 0)

        rows = len(prefixes) * n
        steps = max(budgets)
        tokens = torch.full((rows, steps), self.pad, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, steps, device=device)
        entropies = torch.zeros(rows, steps, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        row = torch.arange(rows, device=device)        # which output row each batch row fills
        stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        keep_states = self.prefix_store is not None and isinstance(cache.layers[0], _BufferedLayer)

        def store(batch_rows: torch.Tensor) -> None:
            """Keep the KV states of these batch rows: their prefix and all but the last token they
            sampled (the last one was never run through the model)."""
            if not keep_states or self.prefix_store.full() or len(batch_rows) == 0:
                return
            rows_out = row[batch_rows]
            firsts = (mask.shape[1] - mask[batch_rows].sum(-1)).tolist()  # each row's left padding
            # One transfer of the rows' tokens, not one per row (each is a device sync on a GPU).
            paths = [(prefixes[r // n] + sampled[:length - 1], first) for r, sampled, length, first
                     in zip(rows_out.tolist(), tokens[rows_out].tolist(), lengths[rows_out].tolist(), firsts)]
            self.prefix_store.add(_snapshot(cache, batch_rows), paths)

        greedy = temperature == 0
        for step in range(steps):
            logp = tempered_log_softmax(logits, 1.0 if greedy else temperature)
            token = logp.argmax(-1) if greedy else sample_top_p(logp, top_p)
            live = ~stopped
            tokens[row[live], step] = token[live]
            logprobs[row[live], step] = logp[live].gather(-1, token[live, None]).squeeze(-1)
            entropies[row[live], step] = entropy(logp[live])
            lengths[row[live]] = step + 1
            ended = live & (token == self.eos)
            finished[row[ended]] = True
            stopped |= ended | (step + 1 >= budget)
            if bool(stopped.all()):
                break
            if stopped.float().mean() >= self.COMPACT_FRACTION:
                store(stopped.nonzero().squeeze(-1))
                keep = (~stopped).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                token, mask, position, budget, row = (t[keep] for t in (token, mask, position, budget, row))
                stopped = stopped[keep]
                mask = _trim_left_padding(cache, mask)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                             past_key_values=cache, use_cache=True)
            cache, logits, position = out.past_key_values, out.logits[:, -1], position + 1
        store(torch.arange(len(row), device=device))

        samples = []
        for toks, lps, ents, length, done in zip(tokens.tolist(), logprobs.tolist(), entropies.tolist(),
                                                 lengths.tolist(), finished.tolist()):
            samples.append(Sample(toks[:length], lps[:length], ents[:length], finished=done))
        return samples


@dataclass
class _Stored:
    """Where the KV states of a token sequence are kept: row `row` of a snapshot tensor
    [layers, 2 (keys, values), rows, heads, columns, head_dim], from column `first` on."""

    snapshot: torch.Tensor
    row: int
    first: int
    count: int  # how many of its tokens are asked for

    def states(self) -> torch.Tensor:
        """[layers, 2, heads, count, head_dim]"""
        return self.snapshot[:, :, self.row, :, self.first:self.first + self.count]


class _PrefixStore:
    """The KV states of the token sequences sampled so far in one search, found by prefix.

    States are kept as snapshots of whole decode batches (one copy per layer and batch, not per
    row), with a token sequence and its place in a snapshot per row. `find(p)` gives the states of
    p from any sequence that starts with p: the sequences are kept sorted, and all those that start
    with p follow p directly in that order. Snapshots stop being taken once they hold `max_bytes`
    (the first ones, the chains, are what the first forks need); prefixes found in none are run
    through the model as usual.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: list[tuple[tuple[int, ...], torch.Tensor, int, int]] = []
        self.sorted = True

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def add(self, snapshot: torch.Tensor, rows: Sequence[tuple[Sequence[int], int]]) -> None:
        """Keep a snapshot and, for each of its rows, the tokens whose states it holds and the
        column where they start."""
        self.bytes += snapshot.numel() * snapshot.element_size()
        self.entries += [(tuple(tokens), snapshot, row, first) for row, (tokens, first) in enumerate(rows)]
        self.sorted = False

    def find(self, tokens: Sequence[int]) -> _Stored | None:
        if not self.sorted:
            self.entries.sort(key=lambda entry: entry[0])
            self.sorted = True
        key = tuple(tokens)
        i = bisect.bisect_left(self.entries, key, key=lambda entry: entry[0])
        if i < len(self.entries) and self.entries[i][0][:len(key)] == key:
            _, snapshot, row, first = self.entries[i]
            return _Stored(snapshot, row, first, len(key))
        return None


def _snapshot(cache, batch_rows: torch.Tensor) -> torch.Tensor:
    """The KV states of some rows of a buffered cache, as [layers, 2, rows, H, columns, D]."""
    return torch.stack([torch.stack([layer.keys[batch_rows], layer.values[batch_rows]]) for layer in cache.layers])


def _load_states(cache, stored: Sequence[_Stored], width: int) -> None:
    """Fill an empty buffered cache with stored states, one row per entry, right-aligned at
    `width` columns (left padding before the shorter ones): one copy per row for all layers."""
    first = stored[0].snapshot
    layers, _, _, heads, _, dim = first.shape
    states = first.new_zeros(layers, 2, len(stored), heads, width, dim)
    for b, s in enumerate(stored):
        states[:, :, b, :, width - s.count:] = s.states()
    for k, layer in enumerate(cache.layers):
        layer.load(states[k, 0], states[k, 1])


class _BufferedLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for the whole decode.

    transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies
    the whole cache every step: decoding k tokens copies O(k^2) token states, and on a 2-core CPU
    that copy took about as long as the model's matrix products (30M-parameter model, batch 256,
    140 positions). Here each step writes its new states into place and the attention reads a view
    of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_zeros(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"KV buffer of {self.key_buffer.shape[-2]} positions overflowed ({end})")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from given states [batch, heads, tokens, head_dim] instead of empty."""
        self.lazy_initialization(keys, values)
        self.update(keys, values)

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._refresh()

    def drop_first(self, columns: int) -> None:
        """Forget the first `columns` positions (padding that no row attends to any more)."""
        self.key_buffer = self.key_buffer[:, :, columns:]
        self.value_buffer = self.value_buffer[:, :, columns:]
        self.length -= columns
        self._refresh()


def preallocated_kv_cache(model, capacity: int) -> DynamicCache:
    """A KV cache for one decode of at most `capacity` positions: buffered layers where the model
    uses plain growing ones, the model's own cache layers otherwise (sliding windows, ...)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_BufferedLayer(capacity) for _ in cache.layers]
    return cache


def _trim_left_padding(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row still in the batch, from the KV
    cache and the attention mask, and return the mask. Rows are left-padded to the longest prefix
    of the batch; once that row has left, its padding would be attended over for nothing."""
    first = int(mask.any(0).int().argmax())  # the first column some row attends to
    if first == 0 or not all(isinstance(layer, _BufferedLayer) for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.drop_first(first)
    return mask[:, first:]


def _per_prefix(max_new_tokens: int | Sequence[int], count: int) -> list[int]:
    """A token budget for each of `count` prefixes, from one shared limit or a list of them."""
    budgets = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != count:
        raise ValueError(f"max_new_tokens: got {len(budgets)} budgets for {count} prefixes")
    if any(int(b) != b or b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be positive integers; got {sorted(set(budgets))[:5]}")
    return [int(b) for b in budgets]


def sample_top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row of log-probs [B, V], drawn from the smallest set of most likely tokens
    whose probabilities add up to at least `top_p` (nucleus sampling), renormalised."""
    probs = logp.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the tokens more likely than it hold less than top_p (the top one always).
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy of a next-token distribution known only through the log-probs of its k most likely
    tokens (what vLLM returns), an approximation of H = -sum_v p_v log p_v.

    The k seen tokens contribute their terms exactly. The unseen tail holds the rest of the mass,
    r = 1 - sum_k p_i, and each tail token is at most as likely as the k-th one, so each of its
    terms has -log q >= -log p_k. Counting the whole tail at that rate gives

        H  ~=  -sum_{i<=k} p_i log p_i  -  r log p_k        (a lower bound on H)

    exact when k covers the vocabulary (r = 0), and close to H when the distribution is peaked
    (r small), which is where a fork decision is made: the top-k tokens of an LLM usually hold
    nearly all the mass. Non-finite entries (tokens cut by top-p) are ignored.
    """
    logps = [lp for lp in top_logprobs if math.isfinite(lp)]
    if not logps:
        return 0.0
    probs = [math.exp(lp) for lp in logps]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * lp for p, lp in zip(probs, logps)) - tail * min(logps)


class VLLMBackend:
    """Sampling with vLLM, colocated: the engine runs inside the training process, beside the model.

    What vLLM adds over `generate` for EPTree: paged attention with a prefix cache. The KV of a
    prefix (the prompt, and for every fork the response up to the fork point) is computed once and
    re-used by the n samples of a request and by later requests that start with it, so the T
    continuations of a fork cost only their new tokens. (The cache works in whole KV blocks: a
    prefix shorter than one block is recomputed.)

    The engine holds its own copy of the weights. `sync(model)` copies the trainer's weights into
    it after every optimizer step, in place, and empties the prefix cache, whose KV was computed
    with the old weights. How the engine is set up, and why:

    * token-id prompts and no tokenizer in the engine (`skip_tokenizer_init`): the trainer
      tokenizes; the engine stops at `eos_token_id` and nowhere else (`ignore_eos` turns off the
      model config's own end tokens, `stop_token_ids` puts ours back), as HFBackend does;
    * dummy start: only config.json is written and the engine starts with random weights
      (`load_format="dummy"`); the first `sync` loads the trainer's, so nothing is read from disk
      (`path`, a save_pretrained folder of the same weights, makes the engine read them instead);
    * memory: on a GPU the engine may take `gpu_memory_utilization` of the card (its weights,
      activations and KV cache; the trainer has the rest), or exactly `kv_cache_gb` of KV cache;
      on the CPU build the KV cache is always sized by `kv_cache_gb` (default 0.25 GiB), since
      vLLM would otherwise reserve a share of the machine's memory;
    * sleep (GPU only, on by default there): `sleep()` frees the engine's weights and KV cache so
      that the update has the memory, and `sync` brings them back. Level 2, no CPU copy of the
      weights, because `sync` overwrites them anyway;
    * log-probs (`logprobs_mode="processed_logprobs"`): vLLM reports log-probs of softmax(logits/T),
      the temperature-scaled distribution, like `token_stats`; greedy decoding reports T = 1.
      With top_p < 1 they are of the nucleus distribution that was actually sampled (renormalised
      after the cut), where HFBackend reports the distribution before the cut. The update never
      uses them as old log-probs (it recomputes those), only the fork scores do;
    * fork scores: `nll` is -log p of the chosen token, exact; `entropy` is `topk_entropy` over
      the `entropy_top_k` log-probs vLLM returns per position (exact when that covers the vocabulary);
    * randomness: each request gets a seed drawn from torch's global generator, so
      `torch.manual_seed` fixes the samples, as it does for HFBackend (vLLM gives the i-th of n
      samples seed + i).

    vLLM is imported here, not at the top of the module: the project runs without it.
    VLLM_ENABLE_V1_MULTIPROCESSING=0 (set unless the user set it) keeps the engine in this process,
    which in-place weight loading needs; scripts that build this backend keep their entry point
    under `if __name__ == "__main__":`, as vLLM asks. On the CPU build the engine also pins this
    process's OpenMP threads to the cores and turns later `torch.set_num_threads` calls into
    no-ops: the trainer shares its threads.
    """

    def __init__(self, model, eos_token_id: int, gpu_memory_utilization: float = 0.3,
                 kv_cache_gb: float = 0.0, entropy_top_k: int = 20, sleep: bool | None = None,
                 seed: int = 0, max_model_len: int | None = None, block_size: int | None = None,
                 path: str | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        self.eos, self.top_k = eos_token_id, entropy_top_k
        self.sleep_enabled = on_gpu if sleep is None else (sleep and on_gpu)
        self.asleep = False
        self.workdir = tempfile.mkdtemp(prefix="treerl-vllm-")
        # Running totals, for the benchmark and the logs.
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0,
                      "syncs": 0, "sync_seconds": 0.0, "fallback_syncs": 0}
        self.engine_args = dict(
            dtype=str(model.dtype).removeprefix("torch."), seed=seed, skip_tokenizer_init=True,
            enable_prefix_caching=True, max_logprobs=entropy_top_k,
            logprobs_mode="processed_logprobs", generation_config="vllm",
            max_model_len=max_model_len, enable_sleep_mode=self.sleep_enabled,
            # CUDA graphs on a GPU; eager on the CPU build (no graph to capture, no compile time).
            enforce_eager=not on_gpu, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=int((kv_cache_gb or (0.0 if on_gpu else 0.25)) * 2**30) or None,
            # Only whole KV blocks are cached. vLLM's CPU default (128 tokens) is longer than a
            # whole response of the CPU task; 32 is the smallest size its CPU kernels prefer.
            block_size=block_size or (None if on_gpu else 32),
            # On the CPU build, a prompt whose prefill is split over two engine steps ("chunked
            # prefill") crashes seeded sampling (vLLM rewinds the request's torch.Generator with
            # set_offset, which CPU generators lack); so on CPU every prefill runs in one step.
            enable_chunked_prefill=None if on_gpu else False)
        if path is not None:  # a saved checkpoint of `model` (save_pretrained): read it
            self.llm = self._start_engine(path, load_format="auto")
        else:
            _save_config(model, self.workdir)
            self.llm = self._start_engine(self.workdir, load_format="dummy")
            self.sync(model)

    def _start_engine(self, path: str, load_format: str):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("the vllm backend needs vLLM: `pip install -r requirements-gpu.txt` on a "
                              "GPU, `pip install -r requirements-cpu-vllm.txt` on CPU (see README)") from error
        _quiet_rotary_reload_warning()
        return LLM(model=path, load_format=load_format, **self.engine_args)

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, prefixes, n, max_new_tokens, temperature=1.0, top_p=1.0):
        from vllm import SamplingParams

        if self.asleep:
            raise RuntimeError("VLLMBackend.sample: the engine is asleep; call sync(model) first")
        greedy = temperature == 0
        # One request of n samples per prefix; vLLM allows n > 1 only when sampling, so greedy
        # decoding sends n copies of the request instead (the prefix cache shares their KV).
        copies, per_request = (n, 1) if greedy else (1, n)
        rows = [list(p) for p in prefixes for _ in range(copies)]
        budgets = [b for b in _per_prefix(max_new_tokens, len(prefixes)) for _ in range(copies)]
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        params = [SamplingParams(
            n=per_request, max_tokens=budget, temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p, seed=None if greedy else seed,
            ignore_eos=True, stop_token_ids=[self.eos], logprobs=self.top_k, detokenize=False,
            flat_logprobs=True)  # top-k log-probs as flat lists, not one dict per token
            for seed, budget in zip(seeds, budgets)]
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        samples = []
        for row, out in zip(rows, outputs):
            self.stats["prompt_tokens"] += len(row)
            self.stats["cached_prompt_tokens"] += out.num_cached_tokens or 0
            samples += [self._to_sample(c) for c in out.outputs]
        return [samples[i * n:(i + 1) * n] for i in range(len(prefixes))]

    def _to_sample(self, completion) -> Sample:
        """One vLLM completion as a tree.Sample: tokens, chosen-token log-probs, fork scores."""
        tokens = list(completion.token_ids)
        logprobs, scores = [], []
        for token, (ids, values, ranks) in zip(tokens, _positions(completion.logprobs)):
            # Each position holds the k most likely tokens, plus the chosen one if it is not
            # among them (rank > k).
            logprobs.append(values[ids.index(token)])
            scores.append(topk_entropy([v for v, r in zip(values, ranks) if r <= self.top_k]))
        self.stats["generated_tokens"] += len(tokens)
        finished = bool(tokens) and tokens[-1] == self.eos
        return Sample(tokens, logprobs, scores, finished)

    # ---- weights --------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (GPU only; a no-op elsewhere)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync(self, model) -> None:
        """Make the engine's weights equal the trainer's, and forget all cached KV."""
        started = time.perf_counter()
        if self.asleep:
            torch.cuda.empty_cache()  # give back what the update's activations left cached
            self.llm.wake_up(tags=["weights"])  # memory for the weights first, KV cache later
        try:
            self._load_in_place(model)
        except Exception as error:  # noqa: BLE001 - any failure: fall back to the slow path
            logger.warning("vLLM: in-place weight loading failed (%s: %s); falling back to saving "
                           "the model and restarting the engine from it (slow)",
                           type(error).__name__, error)
            self._restart_from_disk(model)
            self.stats["fallback_syncs"] += 1
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # The cached KV was computed with the old weights: never serve it again.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self.stats["syncs"] += 1
        self.stats["sync_seconds"] += time.perf_counter() - started

    def _load_in_place(self, model) -> None:
        """Copy the trainer's tensors into the engine's model, in place.

        Not `model.load_weights` on the engine's model: the CPU build repacks some weights after
        loading (its linear layers keep them in a kernel layout and drop the parameters'
        `weight_loader`), so a second `load_weights` fails there. The worker's `reload_weights`
        undoes that processing layer by layer, loads checkpoint-format tensors with each model's
        own name mapping (q/k/v into one qkv matrix, tied embeddings, ...) and processes them again;
        it is the same call on the GPU and CPU builds. The engine runs in this process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tensors are handed over by reference, not copied.
        """
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def _restart_from_disk(self, model) -> None:
        """The fallback: save the model, shut the engine down and start a new one that reads it."""
        path = os.path.join(self.workdir, "weights")
        model.save_pretrained(path)
        self._stop_engine()
        self.llm = self._start_engine(path, load_format="auto")
        self.asleep = False  # a new engine starts awake

    def close(self) -> None:
        """Shut the engine down, free its memory and delete its folder (the backend is unusable
        afterwards)."""
        self._stop_engine()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_engine(self) -> None:
        import gc

        from vllm.distributed.parallel_state import (destroy_distributed_environment,
                                                     destroy_model_parallel)
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None
        del llm
        # vLLM's process groups (one process, world size 1) are set up again by the next engine.
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _positions(logprobs):
    """(token ids, log-probs, ranks) at each position of a completion's top-k log-probs, from vLLM's
    flat format (FlatLogprobs: one list of each for all positions, sliced by start/end indices) or
    the list of {token: Logprob} dicts it returns otherwise. The flat format lists the chosen token
    first and again among the top k when it is one of them; each token is kept once."""
    if hasattr(logprobs, "start_indices"):
        for lo, hi in zip(logprobs.start_indices, logprobs.end_indices):
            first = {}  # token id -> index of its first entry
            for i, token in enumerate(logprobs.token_ids[lo:hi], start=lo):
                first.setdefault(token, i)
            keep = list(first.values())
            yield ([logprobs.token_ids[i] for i in keep], [logprobs.logprobs[i] for i in keep],
                   [logprobs.ranks[i] for i in keep])
    else:
        for top in logprobs:
            yield list(top), [lp.logprob for lp in top.values()], [lp.rank for lp in top.values()]


def _quiet_rotary_reload_warning() -> None:
    """Drop one message of vLLM's in-place reload, "RotaryEmbedding: Failed to load weights",
    printed at every sync: the rotary layer's cos/sin table is a buffer that no checkpoint holds,
    so vLLM puts back the table it computed at start-up, which is right (the sync tests compare
    the outputs with transformers')."""
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(getattr(f, "treerl", False) for f in reload_logger.filters):
        def keep(record: logging.LogRecord) -> bool:
            return not (record.getMessage().startswith("RotaryEmbedding") and "Failed to load" in record.getMessage())
        keep.treerl = True
        reload_logger.addFilter(keep)


def _save_config(model, path: str) -> None:
    """config.json for the engine: the trainer's config, with the architecture named (a model built
    in code has none until save_pretrained)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)


# --------------------------------------------------------------------------------------------------
# The rollout step
# --------------------------------------------------------------------------------------------------


@dataclass
class RolloutConfig:
    """How responses are sampled and turned into per-token advantages."""

    algo: str = field(default="treerl", metadata={"help": "treerl (EPTree + process rewards) or chainrl (i.i.d. chains + outcome advantages)"})
    M: int = field(default=4, metadata={"help": "EPTree: initial chains (trees) per prompt; ChainRL: responses per prompt"})
    N: int = field(default=2, metadata={"help": "EPTree: fork points per tree per round"})
    L: int = field(default=1, metadata={"help": "EPTree: rounds of forking"})
    T: int = field(default=2, metadata={"help": "EPTree: continuations sampled per fork point"})
    fork_score: str = field(default="entropy", metadata={"help": "entropy (paper), nll (official release) or random (ablation)"})
    skip_last: int = field(default=4, metadata={"help": "never fork within this many tokens of a response's end"})
    reweight: str = field(default="sqrt", metadata={"help": "sqrt: R(s)/sqrt(|L(s)|) (Eq. 4 re-weighting); none: plain GA+LA"})
    use_global: bool = field(default=True, metadata={"help": "include the global advantage GA (Eq. 2)"})
    use_local: bool = field(default=True, metadata={"help": "include the local advantage LA (Eq. 3)"})
    advantage: str = field(default="grpo", metadata={"help": "ChainRL outcome advantage: grpo, drgrpo or rloo"})
    keep_leaves: int = field(default=0, metadata={"help": "train on a random subset of this many leaves per prompt (0 = all)"})
    truncated_penalty: float = field(default=float("nan"), metadata={"help": "advantage of every token of a response with no EOS (nan: reward 0 like a wrong answer; the release uses -1)"})
    max_new_tokens: int = field(default=64, metadata={"help": "response length limit in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})

    def validate(self) -> None:
        choices = {"algo": ("treerl", "chainrl"), "fork_score": tree.FORK_SCORES,
                   "reweight": tree.REWEIGHTS, "advantage": tree.ADVANTAGE_KINDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("M", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("N", "L", "T", "skip_last", "keep_leaves"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 for RL sampling; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1]; got {self.top_p}")
        if not (self.use_global or self.use_local):
            raise ValueError("--use_global and --use_local cannot both be false")

    @property
    def rounds(self) -> int:
        """L for the search: ChainRL is EPTree with no forking rounds."""
        return self.L if self.algo == "treerl" else 0


@dataclass
class Rollout:
    """The training sequences of one step, and what was seen while producing them."""

    sequences: list[tree.TrainSequence]
    forests: list[tree.Node]
    stats: dict[str, float]


def rollout(backend: Backend, prompts: list[list[int]], golds: list, score: Callable[[list[str], list], list[float]],
            decode: Callable[[list[int]], str], cfg: RolloutConfig, seed: int = 0,
            answer_start: tree.AnswerStartFn | None = None) -> Rollout:
    """Sample forests (or chains) for a batch of prompts, score the leaves, compute advantages.

    score(responses, golds) -> rewards in [0, 1] (a batch call, so verifiers can run in parallel).
    """
    t0 = time.perf_counter()

    def sample_fn(prefixes, n, budgets):  # budgets: what each branch may add to its response
        return backend.sample(prefixes, n, budgets or cfg.max_new_tokens, cfg.temperature, cfg.top_p)

    # Within one search the weights are fixed, so a backend that can may start each fork from the
    # KV states it computed for the prefix when sampling it (HFBackend.reusing_prefixes).
    reusing = getattr(backend, "reusing_prefixes", contextlib.nullcontext)
    with reusing():
        forests = tree.eptree_batch(prompts, sample_fn, cfg.M, cfg.N, cfg.rounds, cfg.T,
                                    fork_score=cfg.fork_score, skip_last=cfg.skip_last,
                                    answer_start=answer_start, seed=seed,
                                    max_response_tokens=cfg.max_new_tokens)
    t1 = time.perf_counter()

    # Verifier rewards on every leaf; a response that never produced EOS scores 0.
    all_leaves = [(i, leaf) for i, root in enumerate(forests) for leaf in tree.leaves(root)]
    texts = [decode(tree.response_tokens(leaf)) for _, leaf in all_leaves]
    verdicts = score(texts, [golds[i] for i, _ in all_leaves])
    for (_, leaf), verdict in zip(all_leaves, verdicts):
        leaf.reward = float(verdict) if leaf.finished else 0.0
    t2 = time.perf_counter()

    # Per-token advantages, one forest (prompt) at a time.
    sequences, zero_signal = [], 0
    penalty = None if math.isnan(cfg.truncated_penalty) else cfg.truncated_penalty
    for k, root in enumerate(forests):
        rewards = {leaf.reward for leaf in tree.leaves(root)}
        if len(rewards) == 1:
            # Every leaf agrees: all advantages are 0, the group carries no signal. Skip it.
            zero_signal += 1
            continue
        if cfg.algo == "treerl":
            advantages = tree.process_rewards(root, cfg.reweight, cfg.use_global, cfg.use_local)
        else:
            advantages = tree.chain_advantages(root, cfg.advantage)
        keep = cfg.keep_leaves or None
        sequences += tree.to_sequences(root, advantages, keep=keep, rng=_rng(seed, k),
                                       truncated_penalty=penalty)

    leaf_rewards = [leaf.reward for _, leaf in all_leaves]
    n_leaves = len(all_leaves)
    stats = {
        "reward": sum(leaf_rewards) / n_leaves,
        "accuracy_chains": _mean([leaf.reward for root in forests for leaf in _chain_leaves(root)]),
        "leaves": n_leaves,
        "zero_signal_frac": zero_signal / len(forests),
        "truncated_frac": sum(not leaf.finished for _, leaf in all_leaves) / n_leaves,
        "response_length": sum(len(tree.response_tokens(leaf)) for _, leaf in all_leaves) / n_leaves,
        "generated_tokens": sum(tree.generated_tokens(root) for root in forests),
        "entropy": _mean([s for root in forests for n in tree.walk(root) if n is not root for s in n.scores]),
        "time_rollout": t1 - t0,
        "time_verify": t2 - t1,
    }
    return Rollout(sequences, forests, stats)


def _chain_leaves(root: tree.Node) -> list[tree.Node]:
    """The leaf that ends each of the M original chains (the leftmost leaf of each tree), so
    accuracy can be compared with ChainRL on the same footing."""
    out = []
    for top in tree.trees(root):
        node = top
        while node.children:
            node = node.children[0]
        out.append(node)
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _rng(seed: int, k: int) -> random.Random:
    return random.Random(seed * 1_000_003 + k)


def answer_start_fn(decode: Callable[[list[int]], str], markers: Sequence[str]) -> tree.AnswerStartFn:
    """Map a task's text markers of the final answer ("Answer:", "\\boxed{") to the token index
    where the answer starts in a response, for EPTree's rule "never fork inside the answer".

    Works for any tokenizer: find the first marker in the decoded text, then binary-search the
    shortest token prefix whose decoding reaches it.
    """

    def answer_start(response: list[int]) -> int | None:
        text = decode(response)
        found = [text.find(m) for m in markers if m in text]
        if not found:
            return None
        position = min(found)
        lo, hi = 0, len(response)  # smallest k with len(decode(response[:k])) > position
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(response[:mid])) > position:
                hi = mid
            else:
                lo = mid + 1
        return max(lo - 1, 0)

    return answer_start


# --------------------------------------------------------------------------------------------------
# The policy update
# --------------------------------------------------------------------------------------------------


@dataclass
class UpdateConfig:
    """The clipped policy-gradient update (GRPO-style, with DAPO's asymmetric clip)."""

    lr: float = field(default=3e-5, metadata={"help": "AdamW learning rate of the RL stage"})
    clip_low: float = field(default=0.2, metadata={"help": "ratio clip below: 1 - clip_low"})
    clip_high: float = field(default=0.28, metadata={"help": "ratio clip above: 1 + clip_high (DAPO's clip-higher)"})
    aggregation: str = field(default="token", metadata={"help": "token: mean over all tokens of the batch (DAPO); sequence: mean per response, then over responses (GRPO)"})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of the k3 KL to a frozen reference model (0: no reference is loaded, as in the release)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    mini_batch_size: int = field(default=0, metadata={"help": "sequences per optimizer step (0: the whole rollout in one step)"})
    micro_batch_size: int = field(default=64, metadata={"help": "sequences per forward/backward (gradient accumulation bounds memory)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping by global norm"})
    pack_tree: bool = field(default=False, metadata={"help": "each token of a forest through the model once (one row per tree, tree mask), instead of one row per leaf; same loss (see packing.py)"})

    def validate(self) -> None:
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"--aggregation must be token or sequence; got {self.aggregation!r}")
        for name in ("lr", "micro_batch_size", "ppo_epochs", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0; got {getattr(self, name)}")
        for name in ("clip_low", "clip_high", "kl_coef", "mini_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if self.clip_low >= 1:
            raise ValueError(f"--clip_low must be < 1 (the ratio is clipped at 1 - clip_low); got {self.clip_low}")


@dataclass
class Batch:
    """Right-padded sequences; every per-token tensor is aligned with the *targets*
    input_ids[:, 1:], so position t holds the quantities of the token predicted at step t."""

    input_ids: torch.Tensor       # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    mask: torch.Tensor            # [B, W-1] 1 on response tokens
    advantages: torch.Tensor      # [B, W-1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.mask[index],
                     self.advantages[index])


def collate(sequences: Sequence[tree.TrainSequence], pad_token_id: int, device="cpu") -> Batch:
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width - 1))
    advantages = torch.zeros((len(sequences), width - 1))
    for row, s in enumerate(sequences):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[row, :p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[row, :p + r] = 1
        # Response token j sits at input position p + j and is predicted from position p + j - 1.
        mask[row, p - 1:p + r - 1] = 1
        advantages[row, p - 1:p + r - 1] = torch.tensor(s.advantages)
    return Batch(ids.to(device), attention.to(device), mask.to(device), advantages.to(device))


def sequence_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target token) at every position, under softmax(logits / temperature): [B, W-1]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return token_stats(logits, batch.input_ids[:, 1:], temperature)[0]


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)), and where the clipped
    branch is the larger one (the gradient is cut there)."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                aggregation: str = "token", ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0, denominator: float | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate on per-token advantages (PPO's objective with GRPO's group advantages).

    per token:  max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)),  rho = pi / pi_old,
                plus kl_coef * (exp(ref - logp) - (ref - logp) - 1)  (the k3 KL estimator)
    token:      sum over all response tokens / number of tokens       (DAPO)
    sequence:   mean over each response's tokens, then mean over responses   (GRPO)

    `denominator` overrides the count (tokens or responses) so that micro-batches of one mini-batch
    add up to the mini-batch's loss under gradient accumulation.
    """
    ratio = torch.exp(logp - old_logp)
    per_token, was_clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
    if aggregation == "token":
        total = (per_token * mask).sum()
        loss = total / (denominator if denominator is not None else mask.sum().clamp(min=1))
    elif aggregation == "sequence":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_sequence.sum() / (denominator if denominator is not None else len(per_sequence))
    else:
        raise ValueError(f"aggregation must be token or sequence; got {aggregation!r}")
    n = mask.sum().clamp(min=1)
    stats = {
        "clip_frac": float((was_clipped.float() * mask).sum() / n),
        "kl": float((kl.detach() * mask).sum() / n),
        "ratio": float((ratio.detach() * mask).sum() / n),
    }
    return loss, stats


def packed_logprobs(model, batch: packing.PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) for every token of packed forests, under softmax(logits / temperature): [B, S].

    One forward over the unique tokens, laid out in the model's rows (a tree per row, or a few short
    ones) with the tree mask and tree positions (packing.py); token i of a forest is scored with the logits at
    `predictor[i]`, the row position of the token before it on its own path. The result is in the
    per-forest layout of `batch.input_ids`.

    The mask goes to SDPA as it is, boolean (its fastest form on CPU); other attentions (eager
    adds the mask to its scores) get it additive, in the model's dtype.
    """
    mask = batch.attention_mask
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    logits = model(input_ids=batch.row_ids, attention_mask=mask, position_ids=batch.row_positions).logits
    return token_stats(logits.flatten(0, 1)[batch.predictor], batch.input_ids, temperature)[0]


def packed_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, batch: packing.PackedBatch,
                       clip_low: float = 0.2, clip_high: float = 0.28,
                       ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                       denominator: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss` on packed forests: the same number, each unique token counted once.

    A token stands for all the (leaf, token) pairs of the flat batch that it is made of. Its
    clipped surrogate is applied to the weighted sum of their positive advantages and to that of
    their negative ones (exact: the surrogate is linear in A on each side of 0, packing.py's
    docstring shows why); its KL term is weighted by the sum of their weights. The weights already
    hold the aggregation (1 per token, or 1 / response length, chosen when packing).
    `denominator` as in policy_loss: response tokens (token) or responses (sequence) of the whole
    mini-batch; by default those of `batch`.
    """
    ratio = torch.exp(logp - old_logp)
    per_token = torch.zeros_like(logp)
    clipped_count = torch.zeros_like(logp)  # (leaf, token) pairs whose clipped branch is active
    for sign in (0, 1):
        surrogate, was_clipped = clipped_surrogate(ratio, batch.advantage[..., sign], clip_low, clip_high)
        per_token = per_token + surrogate
        clipped_count = clipped_count + was_clipped.float() * batch.count_by_sign[..., sign]
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl * batch.weight
    if denominator is None:
        denominator = float(batch.n_tokens if batch.aggregation == "token" else batch.n_sequences)
    loss = per_token.sum() / max(denominator, 1.0)
    # Statistics are means over the flat batch's (leaf, token) pairs, as in policy_loss.
    n = batch.count.sum().clamp(min=1)
    stats = {
        "clip_frac": float(clipped_count.sum() / n),
        "kl": float((kl.detach() * batch.count).sum() / n),
        "ratio": float((ratio.detach() * batch.count).sum() / n),
    }
    return loss, stats


def _tally_micro_batch(sums: dict[str, float], loss: torch.Tensor, stats: dict[str, float], share: float) -> None:
    """Add a micro-batch to its mini-batch's statistics: the losses add up (each is already a share
    of the mini-batch's loss), the per-token means are weighted by the micro-batch's share."""
    sums["loss"] += loss.item()
    for key in ("clip_frac", "kl", "ratio"):
        sums[key] += stats[key] * share


def _step_and_tally(model, optimizer, scheduler, cfg: "UpdateConfig", sums: dict[str, float],
                    totals: dict[str, float]) -> None:
    """Take the optimizer step of a mini-batch and add its statistics to the update's totals."""
    sums["grad_norm"] = _optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
    for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + value


def _optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the accumulated gradient, step, advance the schedule; returns the gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(grad_norm)


def update(model, optimizer, scheduler, sequences: Sequence[tree.TrainSequence], cfg: UpdateConfig,
           pad_token_id: int, temperature: float = 1.0, ref_model=None, seed: int = 0) -> dict[str, float]:
    """One rollout's worth of policy optimisation; returns averaged statistics.

    The old log-probs are recomputed here with the current weights (not taken from the sampler,
    whose numerics may differ, e.g. vLLM's kernels): the ratio starts at exactly 1.
    With cfg.pack_tree the work goes to `update_packed`.
    """
    if cfg.pack_tree:
        return update_packed(model, optimizer, scheduler, sequences, cfg, pad_token_id, temperature,
                             ref_model, seed)
    device = next(model.parameters()).device
    batch = collate(sequences, pad_token_id, device)
    micro = cfg.micro_batch_size

    def in_micro_batches(fn, rows):
        return torch.cat([fn(batch.select(rows[i:i + micro])) for i in range(0, len(rows), micro)])

    everyone = torch.arange(len(batch), device=device)
    with torch.no_grad():
        old_logp = in_micro_batches(lambda b: sequence_logprobs(model, b, temperature), everyone)
        ref_logp = None
        if ref_model is not None and cfg.kl_coef > 0:
            ref_logp = in_micro_batches(lambda b: sequence_logprobs(ref_model, b, temperature), everyone)

    mini = cfg.mini_batch_size or len(batch)
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    steps = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator).to(device)
        for start in range(0, len(batch), mini):
            rows = order[start:start + mini]
            part = batch.select(rows)
            denominator = float(part.mask.sum()) if cfg.aggregation == "token" else float(len(rows))
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio": 0.0}
            for i in range(0, len(rows), micro):
                sub = rows[i:i + micro]
                b = batch.select(sub)
                logp = sequence_logprobs(model, b, temperature)
                loss, stats = policy_loss(
                    logp, old_logp[sub], b.advantages, b.mask, cfg.clip_low, cfg.clip_high,
                    cfg.aggregation, None if ref_logp is None else ref_logp[sub], cfg.kl_coef,
                    denominator)
                loss.backward()
                _tally_micro_batch(sums, loss, stats, float(b.mask.sum()) / max(float(part.mask.sum()), 1.0))
            _step_and_tally(model, optimizer, scheduler, cfg, sums, totals)
            steps += 1
    return {key: value / steps for key, value in totals.items()}


def update_packed(model, optimizer, scheduler, sequences: Sequence[tree.TrainSequence],
                  cfg: UpdateConfig, pad_token_id: int, temperature: float = 1.0, ref_model=None,
                  seed: int = 0) -> dict[str, float]:
    """`update` with tree packing: every token of a forest goes through the model once (its prompt
    once per tree), not once per leaf (packing.py). The sequences find their forest through their
    leaves (`TrainSequence.leaf`).

    The loss is the flat loss, so with the whole rollout in one optimizer step (mini_batch_size 0,
    the default) the gradient is the flat path's too, up to float rounding. Mini-batches hold whole
    forests, as many as fit in mini_batch_size leaves (at least one forest each); so with
    mini_batch_size > 0 the rollout is split into optimizer steps by forest, not by the flat
    path's random split of leaves. Micro-batches hold whole *trees* of the mini-batch (a forest's
    trees share only the prompt, so their losses add up), as many as fit in micro_batch_size
    leaves, longest first: trees of about the same length share a forward, and the rows need
    little padding.
    """
    device = next(model.parameters()).device
    trees: list[packing.PackedForest] = []    # the units of work: a prompt and one tree below it
    forests: list[list[int]] = []             # per forest, the ids of its trees
    for forest in packing.pack_trees(sequences, cfg.aggregation):
        forests.append(list(range(len(trees), len(trees) + len(forest))))
        trees += forest
    leaves = [t.n_sequences for t in trees]
    forest_leaves = [sum(leaves[i] for i in ids) for ids in forests]

    def micro_batches(ids):  # trees of similar length together, longest first
        return packing.group_by_length(sorted(ids), [len(t) for t in trees], leaves, cfg.micro_batch_size)

    # A micro-batch's tensors are built once, kept on the CPU, and reused: the old (and reference)
    # log-probs and every epoch whose mini-batches match go through the same micro-batches.
    built: dict[tuple[int, ...], packing.PackedBatch] = {}

    def collate(ids):
        key = tuple(ids)
        if key not in built:
            built[key] = packing.collate_packed([trees[i] for i in ids], pad_token_id)
        return built[key].to(device)

    def logprobs_per_tree(m) -> list[torch.Tensor]:
        out = [torch.empty(0)] * len(trees)
        for ids in micro_batches(range(len(trees))):
            logp = packed_logprobs(m, collate(ids), temperature)
            for row, i in enumerate(ids):
                out[i] = logp[row, :len(trees[i])]
        return out

    def padded(per_tree, ids):  # per-tree log-probs laid out like collate(ids)
        return torch.nn.utils.rnn.pad_sequence([per_tree[i] for i in ids], batch_first=True)

    with torch.no_grad():
        old_logp = logprobs_per_tree(model)
        ref_logp = None
        if ref_model is not None and cfg.kl_coef > 0:
            ref_logp = logprobs_per_tree(ref_model)

    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    steps = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(forests), generator=generator).tolist()
        for mini in packing.group_by_size(order, forest_leaves, cfg.mini_batch_size or sum(leaves)):
            mini = [i for f in mini for i in forests[f]]
            tokens = sum(trees[i].n_tokens for i in mini)
            denominator = float(tokens) if cfg.aggregation == "token" else float(sum(leaves[i] for i in mini))
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio": 0.0}
            for ids in micro_batches(mini):
                b = collate(ids)
                logp = packed_logprobs(model, b, temperature)
                loss, stats = packed_policy_loss(
                    logp, padded(old_logp, ids), b, cfg.clip_low, cfg.clip_high,
                    None if ref_logp is None else padded(ref_logp, ids), cfg.kl_coef, denominator)
                loss.backward()
                _tally_micro_batch(sums, loss, stats, b.n_tokens / max(tokens, 1))
            _step_and_tally(model, optimizer, scheduler, cfg, sums, totals)
            steps += 1
    result = {key: value / steps for key, value in totals.items()}
    result["packed_token_ratio"] = packing.token_ratio(sequences)
    return result
