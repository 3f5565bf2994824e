"""The transformers rollout backend: a batched KV-cache decode loop over the model being trained.

Skip this file on a first reading: it is how `treerl.Backend.sample` is made fast on one machine,
not part of the algorithm. `treerl.rollout` only calls `sample(prefixes, n, budgets, ...)` and,
where a backend has it, `reusing_prefixes()`.

What it makes faster, against transformers' `generate` (`python -m eval.bench throughput` measures it):

- one prefill per prefix, shared by the prefix's n continuations;
- forks that start from the stored KV states of their prefix instead of re-reading it;
- a token budget per prefix, and finished rows that leave the batch;
- a KV cache written in place (transformers' cache appends with `torch.cat`, a full copy per step).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from logprobs import tempered_log_softmax
from tree import Sample


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
      (`eval.bench throughput`, docs/performance.md); so by default it is on for a model on a CPU.
    - **A budget per prefix.** A fork's branches may only fill what is left of the response budget
      below the fork, which differs from prefix to prefix (`max_new_tokens` may be a list).
    - **Finished rows leave the batch.** A row stops at EOS or at its budget; the batch is
      compacted (rows dropped from the KV cache) once an eighth of it has stopped, so short and
      long continuations share a batch without the short ones being computed to the longest's end.

    Each token's log-prob and entropy come from the step's logits, which the loop has anyway, so
    memory stays one [batch, vocab] tensor however long the responses.
    """

    COMPACT_FRACTION = 1 / 8  # drop stopped rows once they are this share of the batch

    def __init__(
        self,
        model,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        batch_size: int = 256,
        reuse_prefixes: bool | None = None,
        kv_cache_bytes: int = 0,
    ):
        self.model, self.eos, self.pad, self.batch_size = model, eos_token_id, pad_token_id, batch_size
        self.kv_cache_bytes = kv_cache_bytes  # most memory the KV cache of one decode batch may take (0: any)
        self.stop_ids = stop_token_list(eos_token_id)
        if reuse_prefixes is None:  # see the class docstring
            reuse_prefixes = next(model.parameters()).device.type == "cpu"
        self.reuse_prefixes = reuse_prefixes
        self.prefix_store: _PrefixStore | None = None  # set inside reusing_prefixes()
        # Prefix tokens asked for (once per prefix, not per continuation), those whose KV states
        # came from the store instead of a forward pass, and the forward passes run (one per
        # decode step of a batch, and its start).
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "forward_passes": 0}

    def sync(self, model) -> None:
        self.model = model

    @contextlib.contextmanager
    def reusing_prefixes(self, max_bytes: int = 4 * 2**30, calls: int | None = None):
        """Within the block, keep the KV states of every sampled row (up to `max_bytes` of them)
        and start later prefixes that extend one of them from those states. For one search: the
        weights must not change inside the block (the states would be stale), and the states are
        dropped when it ends. (A 1.5B model's states take 28 KiB per token: 4 GiB hold about 150k
        tokens, the M chains of 16 prompts at 1.5k tokens each.) With `calls`, only the first
        `calls` sampling calls of the block keep theirs: the forks of an EPTree search of L rounds
        start inside the chains and the first L - 1 rounds, never inside the last round. Does
        nothing when the backend was made with reuse_prefixes=False."""
        self.prefix_store = _PrefixStore(max_bytes if self.reuse_prefixes else 0, calls)
        try:
            yield self
        finally:
            self.prefix_store = None

    @torch.no_grad()
    def sample(self, prefixes, n, max_new_tokens, temperature=1.0, top_p=1.0):
        budgets = budgets_per_prefix(max_new_tokens, len(prefixes))
        if any(not p for p in prefixes):
            raise ValueError("HFBackend.sample: every prefix needs at least one token")
        # KV states already computed for all but the last token of each prefix, where kept.
        stored = [self.prefix_store.find(p[:-1]) if self.prefix_store and len(p) > 1 else None for p in prefixes]
        self.stats["prompt_tokens"] += sum(map(len, prefixes))
        self.stats["cached_prompt_tokens"] += sum(s.count for s in stored if s is not None)
        # A batch is all resumed or all prefilled; prefixes with similar budgets share a batch
        # (`batch_size` rows = prefixes x n, fewer where their KV cache would pass kv_cache_bytes).
        order = sorted(range(len(prefixes)), key=lambda k: (stored[k] is None, -budgets[k]))
        groups: list[list[Sample]] = [[] for _ in prefixes]
        was_training = self.model.training
        self.model.eval()
        progress = None  # a bar for a call of several decode batches (a held-out evaluation), else none
        try:
            start = 0
            while start < len(order):
                chunk = self._next_batch(order[start:], prefixes, n, budgets, stored)
                if progress is None and len(chunk) < len(order) - start:
                    from policy import progress_bar  # the project's bar; imported only where one is shown

                    progress = progress_bar(None, total=len(prefixes), desc="sampling", unit="prefix", leave=False)
                start += len(chunk)
                resumed = stored[chunk[0]] is not None
                samples = self._generate(
                    [list(prefixes[k]) for k in chunk],
                    n,
                    [budgets[k] for k in chunk],
                    temperature,
                    top_p,
                    [stored[k] for k in chunk] if resumed else None,
                )
                for j, k in enumerate(chunk):
                    groups[k] = samples[j * n : (j + 1) * n]
                if progress is not None:
                    progress.update(len(chunk))
        finally:
            self.model.train(was_training)
            if progress is not None:
                progress.close()
        if self.prefix_store is not None:
            self.prefix_store.call_ended()
        return groups

    def _next_batch(self, order, prefixes, n, budgets, stored) -> list[int]:
        """The prefixes of the next decode batch: from the head of `order`, as many as keep to
        `batch_size` rows (n per prefix) and, with kv_cache_bytes, whose KV cache (rows x (longest
        prefix + largest budget) positions) fits in it; all resumed or all prefilled; at least one."""
        chunk, longest, budget = [], 0, 0
        for k in order:
            if chunk and (stored[k] is None) != (stored[chunk[0]] is None):
                break
            longest, budget = max(longest, len(prefixes[k])), max(budget, budgets[k])
            if chunk and (len(chunk) + 1) * n > self.rows_per_batch(longest + budget):
                break
            chunk.append(k)
        return chunk

    def rows_per_batch(self, positions: int) -> int:
        """Rows of one decode batch: `batch_size`, or fewer where the KV cache of that many rows of
        `positions` tokens each would take more than `kv_cache_bytes` (with no limit set, or a
        model as small as the default's, the rows and so the samples drawn are as without one)."""
        if not self.kv_cache_bytes:
            return self.batch_size
        return max(1, min(self.batch_size, self.kv_cache_bytes // (positions * kv_bytes_per_token(self.model))))

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
            _load_states(cache, stored, width - 1, capacity)
            input_ids = torch.tensor([[p[-1]] for p in prefixes], device=device)
            positions = positions[:, -1:]
        self.stats["forward_passes"] += 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
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
        row = torch.arange(rows, device=device)  # which output row each batch row fills
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
            paths = [
                (prefixes[r // n] + sampled[: length - 1], first)
                for r, sampled, length, first in zip(
                    rows_out.tolist(), tokens[rows_out].tolist(), lengths[rows_out].tolist(), firsts
                )
            ]
            self.prefix_store.add(_snapshot(cache, batch_rows), paths)

        greedy = temperature == 0
        stops = torch.tensor(self.stop_ids, device=device)
        for step in range(steps):
            logp = tempered_log_softmax(logits, 1.0 if greedy else temperature)
            probs = logp.exp()  # for the sampler and the entropy both
            token = logp.argmax(-1) if greedy else sample_top_p(probs, top_p)[:, 0]
            # Every batch row is written: a row that has stopped writes past its length, and what
            # lies past a row's length is cut off at the end.
            tokens[row, step] = token
            logprobs[row, step] = logp.gather(-1, token[:, None]).squeeze(-1)
            entropies[row, step] = -(probs * logp).sum(-1)  # as logprobs.entropy, from probs at hand
            live = ~stopped
            lengths[row] += live
            ended = live & torch.isin(token, stops)
            finished[row] |= ended
            stopped |= ended | (step + 1 >= budget)
            halted = int(stopped.sum())
            if halted == len(stopped):
                break
            if halted >= self.COMPACT_FRACTION * len(stopped):
                store(stopped.nonzero().squeeze(-1))
                keep = (~stopped).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                token, mask, position, budget, row = (t[keep] for t in (token, mask, position, budget, row))
                stopped = stopped[keep]
                mask = _trim_left_padding(cache, mask)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            self.stats["forward_passes"] += 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits, position = out.past_key_values, out.logits[:, -1], position + 1
        store(torch.arange(len(row), device=device))

        samples = []
        for toks, lps, ents, length, done in zip(
            tokens.tolist(), logprobs.tolist(), entropies.tolist(), lengths.tolist(), finished.tolist()
        ):
            samples.append(Sample(toks[:length], lps[:length], ents[:length], finished=done))
        return samples


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values that one token adds to a KV cache, from the model's shapes."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def stop_token_list(eos_token_id: int | Sequence[int]) -> list[int]:
    """The tokens that end a response, as a list: training passes the tokenizer's EOS; the
    benchmark harness (eval/evaluate.py) passes every stop token of a chat model, which often has two."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def budgets_per_prefix(max_new_tokens: int | Sequence[int], count: int) -> list[int]:
    """A token budget for each of `count` prefixes, from one shared limit or a list of them."""
    budgets = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != count:
        raise ValueError(f"max_new_tokens: got {len(budgets)} budgets for {count} prefixes")
    if any(int(b) != b or b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be positive integers; got {sorted(set(budgets))[:5]}")
    return [int(b) for b in budgets]


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
        return self.snapshot[:, :, self.row, :, self.first : self.first + self.count]


class _PrefixStore:
    """The KV states of the token sequences sampled so far in one search, found by prefix.

    States are kept as snapshots of whole decode batches (one copy per layer and batch, not per
    row), with a token sequence and its place in a snapshot per row. `find(p)` gives the states of
    p from any sequence that starts with p: the sequences are kept sorted, and all those that start
    with p follow p directly in that order. Snapshots stop being taken once they hold `max_bytes`
    (the first ones, the chains, are what the first forks need), or once `calls` sampling calls
    have ended; prefixes found in none are run through the model as usual.
    """

    def __init__(self, max_bytes: int, calls: int | None = None):
        self.max_bytes, self.bytes = max_bytes, 0
        self.calls_left = calls  # sampling calls whose states are still to be kept (None: all)
        self.entries: list[tuple[tuple[int, ...], torch.Tensor, int, int]] = []
        self.sorted = True

    def full(self) -> bool:
        return self.bytes >= self.max_bytes or self.calls_left == 0

    def call_ended(self) -> None:
        if self.calls_left:
            self.calls_left -= 1

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
        if i < len(self.entries) and self.entries[i][0][: len(key)] == key:
            _, snapshot, row, first = self.entries[i]
            return _Stored(snapshot, row, first, len(key))
        return None


def _snapshot(cache, batch_rows: torch.Tensor) -> torch.Tensor:
    """The KV states of some rows of a buffered cache, as [layers, 2, rows, H, columns, D]."""
    return torch.stack([torch.stack([layer.keys[batch_rows], layer.values[batch_rows]]) for layer in cache.layers])


def _load_states(cache, stored: Sequence[_Stored], width: int, capacity: int) -> None:
    """Fill an empty buffered cache of `capacity` positions with stored states, one row per entry,
    right-aligned at `width` columns (zeros before the shorter ones: padding, masked out, but read
    by the attention): one copy per row for all layers, straight into the layers' buffers."""
    first = stored[0].snapshot
    layers, _, _, heads, _, dim = first.shape
    buffers = first.new_empty(layers, 2, len(stored), heads, capacity, dim)
    for b, s in enumerate(stored):
        buffers[:, :, b, :, : width - s.count] = 0
        buffers[:, :, b, :, width - s.count : width] = s.states()
    for k, layer in enumerate(cache.layers):
        layer.load(buffers[k, 0], buffers[k, 1], width)


class _BufferedLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for the whole decode.

    transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies
    the whole cache every step: decoding k tokens copies O(k^2) token states, and on a small model
    on a CPU that copy can cost as much as the model's matrix products (measured: docs/performance.md,
    section "Where the default run's time goes, on a slow CPU"). Here each step writes its new
    states into place and the attention reads a view of the filled part. Positions past the filled
    part are never read, so a new buffer is left uninitialised there and copies of it (a row's
    continuations, the rows left after a compaction) copy the filled part only.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"KV buffer of {self.key_buffer.shape[-2]} positions overflowed ({end})")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def load(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Start from buffers [batch, heads, capacity, head_dim] whose first `length` positions
        hold states, instead of empty ones."""
        super().lazy_initialization(key_buffer, value_buffer)
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer, self.value_buffer = (_repeat_rows(b, self.length, repeats) for b in self.buffers())
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = (_select_rows(b, self.length, indices) for b in self.buffers())
        self._refresh()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_buffer, self.value_buffer

    def drop_first(self, columns: int) -> None:
        """Forget the first `columns` positions (padding that no row attends to any more)."""
        self.key_buffer = self.key_buffer[:, :, columns:]
        self.value_buffer = self.value_buffer[:, :, columns:]
        self.length -= columns
        self._refresh()


def _repeat_rows(buffer: torch.Tensor, length: int, repeats: int) -> torch.Tensor:
    """A new buffer like `buffer` [B, H, capacity, D] with every row repeated `repeats` times
    (row-major: a row's copies next to each other); only the first `length` positions copied."""
    rows, heads, capacity, dim = buffer.shape
    out = buffer.new_empty(rows, repeats, heads, capacity, dim)
    out[:, :, :, :length] = buffer[:, None, :, :length]
    return out.view(rows * repeats, heads, capacity, dim)


def _select_rows(buffer: torch.Tensor, length: int, indices: torch.Tensor) -> torch.Tensor:
    """A new buffer like `buffer` [B, H, capacity, D] with its rows `indices`; only the first
    `length` positions copied."""
    out = buffer.new_empty(len(indices), *buffer.shape[1:])
    torch.index_select(buffer[:, :, :length], 0, indices, out=out[:, :, :length])
    return out


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


def sample_top_p(probs: torch.Tensor, top_p: float, samples: int = 1) -> torch.Tensor:
    """Tokens drawn from each row of probabilities [B, V]: `samples` independent draws per row
    ([B, samples]), each from the smallest set of most likely tokens whose probabilities add up
    to at least `top_p` (nucleus sampling), renormalised."""
    if top_p >= 1.0:
        return draw(probs.cumsum(-1, dtype=torch.float64), samples)
    # Most likely first; tied tokens in token order, so the nucleus is the same set every time.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(-1, dtype=torch.float64)
    # Keep a token if the tokens more likely than it hold less than top_p (the top one always):
    # the kept tokens lead the sorted row, so the draw is among its first `kept`, renormalised
    # by the mass they hold.
    kept = ((cdf - sorted_probs) < top_p).sum(-1, keepdim=True)
    return order.gather(-1, draw(cdf, samples, total=cdf.gather(-1, kept - 1)))


def draw(cdf: torch.Tensor, samples: int = 1, total: torch.Tensor | None = None) -> torch.Tensor:
    """`samples` independent indices per row [B, samples], index i with probability w_i / total,
    from the running sums of non-negative weights w (`cdf` [B, V] float64: cdf[:, i] = w_0 + ... +
    w_i). `total` [B, 1] defaults to each row's whole sum; a smaller one (a running sum of the
    row) draws among the indices up to it.

    Inverse transform sampling: one uniform number u per draw, and the first index whose running
    sum exceeds u * total. torch.multinomial draws from the same distribution with one random
    number per entry (an exponential race), which over a 49k-token vocabulary costs a real
    model's decode step much more than a running sum does. The sums are float64, exact to far
    below what any number of draws could tell apart. An index of zero weight is never drawn (its
    running sum equals the one before it, which is already past any target it could have), and
    the target stays strictly below the total, so the index never runs past the last weighted one.
    """
    total = cdf[:, -1:] if total is None else total
    if not bool((total > 0).all()):  # NaN logits, or nothing to draw from
        raise ValueError("sampling: a row of probabilities is all zero or not a number")
    u = torch.rand(len(cdf), samples, dtype=torch.float64, device=cdf.device)
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)
