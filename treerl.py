"""TreeRL's training step: rollout, advantages, loss, update (Section 3 of the paper).

One TreeRL step (Hou et al., 2025, arXiv 2506.11902) is

    prompts ──► rollout: an EPTree forest per prompt (tree.eptree_batch, Algorithm 1), sampled
            │   through a Backend
            ──► verifier rewards on every leaf (the `score` callback: rewards.py), 0 for a
            │   response that never ended
            ──► per-token advantages: R(s) of Eqs. 2-4 for TreeRL (tree.process_rewards), or an
            │   outcome advantage (GRPO / Dr. GRPO / RLOO) for ChainRL, which is the same rollout
            │   with L = 0
            ──► update: a clipped policy-gradient loss on those advantages (GRPO-style, with
                DAPO's asymmetric clip), then backend.sync(model)

Read it top to bottom: the Backend protocol, the rollout settings and `rollout`, then the update
settings, `policy_loss`, the batch layouts and `update`. Its settings helpers (`settings.py`), the
token log-probs and the flat batch (`logprobs.py`) live in modules of their own, shared with the
engines, the packed layout and the warm start; a first reading skips them.

Engines stay outside: `hf_backend.HFBackend` (a KV-cache decode loop over the transformers model)
and `vllm_backend.VLLMBackend` (a colocated vLLM engine) implement the protocol, and any engine
with the same two methods plugs in. `update` takes a batch layout: one row per leaf
(`FlatLayout`), or `packing.TreeLayout`, each token of a forest through the model once
(`--pack_tree`, the default): the same loss, `policy_loss`, less compute.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

import logprobs
import probes
import release
import tree
from settings import arg, check_choices
from tree import Sample

# --------------------------------------------------------------------------------------------------
# What the rollout needs from a generation engine
# --------------------------------------------------------------------------------------------------


class Backend(Protocol):
    """What the rollout needs from a generation engine.

    An engine that keeps its own copy of the weights may also have `sleep()`, to free its memory
    before the update (train.py calls it when present; `sync` brings the engine back), and
    `close()`, to shut it down at the end of a run (VLLMBackend has both).
    """

    def sample(
        self,
        prefixes: list[list[int]],
        n: int,
        max_new_tokens: int | Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[list[Sample]]:
        """For each prefix, n independent continuations (EOS included as last token when one was
        produced), each token's log-prob and the entropy of its sampling distribution.
        `max_new_tokens` is one limit for all prefixes or one per prefix (a fork's branches may
        only fill what the response budget leaves below the fork)."""

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (called after every update)."""


# --------------------------------------------------------------------------------------------------
# The rollout step
# --------------------------------------------------------------------------------------------------


@dataclass
class TreeConfig:
    """EPTree (Algorithm 1) and its process rewards (Eqs. 2-4): the settings train.py and
    trl_treerl.py share. The release's settings are explained in release.py."""

    M: int = arg(4, "EPTree: initial chains (trees) per prompt; ChainRL: responses per prompt")
    N: int = arg(2, "EPTree: fork points per tree per round")
    L: int = arg(1, "EPTree: rounds of forking (0: M independent chains)")
    T: int = arg(2, "EPTree: continuations sampled per fork point")
    fork_score: Literal["nll", "entropy", "random"] = arg("nll", "nll: -log p of the sampled token (Algorithm 1)")
    fork_exclusions: Literal["default", "release"] = arg("default", "where a tree may not fork (tree.Forkable)")
    skip_last: int = arg(4, "never fork within this many tokens of a response's end")
    full_length_branches: bool = arg(False, "a branch may add max_new_tokens of its own (the release)")
    leave_one_out: bool = arg(False, "centre leaf rewards leave-one-out before V(s) (the release)")
    reweight: Literal["sqrt", "none", "release"] = arg("sqrt", "sqrt: R(s) / sqrt(|L(s)|) (Eq. 4); none: GA + LA")
    fill_in_paths: bool = arg(False, "a local advantage of ~0 takes the one above it (the release)")
    use_global: bool = arg(True, "include the global advantage GA (Eq. 2)")
    use_local: bool = arg(True, "include the local advantage LA (Eq. 3)")
    truncated_penalty: float = arg(float("nan"), "advantage of a response with no EOS (nan: reward 0)")

    def validate(self) -> None:
        check_choices(self, TreeConfig)
        if self.M < 1:
            raise ValueError(f"--M must be >= 1; got {self.M}")
        for name in ("N", "L", "T", "skip_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not (self.use_global or self.use_local):
            raise ValueError("--use_global and --use_local cannot both be false")

    @property
    def forest_size(self) -> int:
        """Leaves of a full forest: M chains, plus T new leaves per fork, N forks per tree, L rounds."""
        return self.M * (1 + self.L * self.N * self.T)

    @property
    def penalty(self) -> float | None:
        """`truncated_penalty` as tree.to_sequences takes it (None: no penalty)."""
        return None if math.isnan(self.truncated_penalty) else self.truncated_penalty

    def fork_candidates(self, decode, answer_start: tree.AnswerStartFn | None) -> tree.ForkCandidates:
        """Where a tree may fork: the paper's rule, or the release's stop words."""
        if self.fork_exclusions == "release":
            return release.StopWordForks(release.stop_word_fn(decode))
        return tree.Forkable(self.skip_last, answer_start)

    def process_rewards(self, root: tree.Node, kept: Sequence[tree.Node] | None = None) -> dict[tree.Node, float]:
        """R(s) of every segment of a scored forest with these settings; `kept` are the leaves
        trained on (the release's re-weighting counts them)."""
        if self.leave_one_out or self.fill_in_paths or self.reweight == "release":
            settings = (self.leave_one_out, self.reweight, self.fill_in_paths, self.use_global, self.use_local)
            return release.process_rewards(root, kept, *settings)
        return tree.process_rewards(root, self.reweight, self.use_global, self.use_local)


@dataclass
class RolloutConfig(TreeConfig):
    """How responses are sampled and turned into per-token advantages: the search settings above,
    the algorithm, and sampling."""

    algo: Literal["treerl", "chainrl"] = arg("treerl", "EPTree + process rewards, or i.i.d. chains + outcome")
    advantage: Literal["grpo", "drgrpo", "rloo"] = arg("grpo", "ChainRL's outcome advantage")
    clamp_advantages: bool = arg(False, "ChainRL: negative advantages at least -max A (the release's RLOO)")
    blame: Literal["none", "oracle", "placebo"] = arg(
        "none", "experiment (arithmetic tasks): a wrong leaf's advantage mass on its first wrong line, or a random one"
    )
    fork_credit: Literal["segment", "fork_line", "fork_line_local"] = arg(
        "segment", "experiment: a forked segment's R(s) mass (or its local part) on its first line (probes.py)"
    )
    keep_leaves: int = arg(0, "train on this many leaves per prompt, one correct if any (0: all)")
    keep_zero_signal: bool = arg(False, "train on forests whose leaves all agree too (the release)")
    max_new_tokens: int = arg(64, "response length limit in tokens")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling threshold")

    def validate(self) -> None:
        super().validate()
        check_choices(self, RolloutConfig)
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.keep_leaves < 0:
            raise ValueError(f"--keep_leaves must be >= 0; got {self.keep_leaves}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 for RL sampling; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1]; got {self.top_p}")
        release_rewards = self.leave_one_out or self.fill_in_paths or self.reweight == "release"
        if self.fork_credit != "segment" and (self.algo != "treerl" or release_rewards):
            raise ValueError(f"--fork_credit {self.fork_credit} moves the paper's process rewards (--algo treerl)")

    @property
    def rounds(self) -> int:
        """L for the search: ChainRL is EPTree with no forking rounds."""
        return self.L if self.algo == "treerl" else 0

    def grow_forests(self, prompts, sample_fn: tree.SampleFn, candidates: tree.ForkCandidates, seed: int):
        """EPTree (Algorithm 1) with these settings, one forest per prompt: M chains each for ChainRL."""
        shape, budget = (self.M, self.N, self.rounds, self.T), self.max_new_tokens
        return tree.eptree_batch(
            prompts, sample_fn, *shape, self.fork_score, candidates, seed, budget, self.full_length_branches
        )


@dataclass
class Rollout:
    """The training sequences of one step, and what was seen while producing them."""

    sequences: list[tree.TrainSequence]
    forests: list[tree.Node]
    stats: dict[str, float]


def rollout(
    backend: Backend,
    prompts: list[list[int]],
    golds: list,
    score: Callable[[list[str], list], list[float]],
    decode: Callable[[list[int]], str],
    cfg: RolloutConfig,
    seed: int = 0,
    answer_start: tree.AnswerStartFn | None = None,
    step_truth: probes.StepTruthFn | None = None,
) -> Rollout:
    """Sample forests (or chains) for a batch of prompts, score the leaves, compute advantages.

    score(responses, golds) -> rewards in [0, 1] (a batch call, so verifiers can run in parallel).
    step_truth: where each response goes wrong, for `cfg.blame` (an experiment: probes.py).
    """
    if cfg.blame != "none" and step_truth is None:
        raise ValueError(f"--blame {cfg.blame} needs a task that knows its steps' truth (--task arith or arith_chat)")
    t0 = time.perf_counter()

    def sample_fn(prefixes, n, budgets):  # budgets: what each branch may add to its response
        return backend.sample(prefixes, n, budgets or cfg.max_new_tokens, cfg.temperature, cfg.top_p)

    # Within one search the weights are fixed, so a backend that can may start each fork from the
    # KV states it computed for the prefix when sampling it (HFBackend.reusing_prefixes); only the
    # chains and the rounds before the last hold prefixes of later forks.
    reusing = getattr(backend, "reusing_prefixes", None)
    with reusing(calls=cfg.rounds) if reusing else contextlib.nullcontext():
        forests = cfg.grow_forests(prompts, sample_fn, cfg.fork_candidates(decode, answer_start), seed)
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
    for k, root in enumerate(forests):
        found = tree.leaves(root)
        if len({leaf.reward for leaf in found}) == 1:
            zero_signal += 1
            # Every leaf agrees: every advantage is 0 and the forest carries no signal, unless
            # truncated responses are penalised. Skip it (the release keeps it).
            penalised = cfg.penalty is not None and not all(leaf.finished for leaf in found)
            if not (penalised or cfg.keep_zero_signal):
                continue
        sequences += forest_sequences(root, cfg, _rng(seed, k), decode)
    blamed = 0
    if cfg.blame != "none":
        sequences, blamed = probes.relocate_blame(sequences, step_truth, cfg.blame, _rng(seed, len(forests)))

    leaf_rewards = [leaf.reward for _, leaf in all_leaves]
    n_leaves = len(all_leaves)
    stats = {
        "reward": sum(leaf_rewards) / n_leaves,
        "accuracy_chains": _mean([leaf.reward for root in forests for leaf in chain_leaves(root)]),
        "leaves": n_leaves,
        "zero_signal_frac": zero_signal / len(forests),
        "truncated_frac": sum(not leaf.finished for _, leaf in all_leaves) / n_leaves,
        "response_length": sum(len(tree.response_tokens(leaf)) for _, leaf in all_leaves) / n_leaves,
        "generated_tokens": sum(tree.generated_tokens(root) for root in forests),
        "entropy": _mean([s for root in forests for n in tree.walk(root) if n is not root for s in n.entropies]),
        "time_rollout": t1 - t0,
        "time_verify": t2 - t1,
        # The size of the update's policy-gradient term: balances a KL penalty across methods.
        "mean_abs_advantage": _mean(abs(a) for seq in sequences for a in seq.advantages),
    }
    if cfg.blame != "none":
        stats["blamed_leaves"] = blamed
    return Rollout(sequences, forests, stats)


def forest_sequences(
    root: tree.Node, cfg: RolloutConfig, rng: random.Random, decode: Callable[[list[int]], str] | None = None
) -> list[tree.TrainSequence]:
    """One scored forest as training sequences: the leaves to train on (all, or `keep_leaves` of
    them drawn with `rng`), the advantage of every segment, every token carrying its segment's.
    This is where advantages become per-token: a per-token credit maps a segment to a list of one
    advantage per token instead of one number, and tree.to_sequences passes it on as it is.
    `decode` (token ids to text) is needed only where --fork_credit looks for line ends."""
    chosen = tree.pick_leaves(root, cfg.keep_leaves or None, rng)
    if cfg.algo == "treerl":
        advantages = cfg.process_rewards(root, chosen)
        if cfg.fork_credit != "segment":  # an experiment: probes.py
            advantages = probes.on_fork_lines(root, advantages, cfg, decode)
    else:
        advantages = tree.chain_advantages(root, cfg.advantage, cfg.clamp_advantages)
    return tree.to_sequences(root, advantages, truncated_penalty=cfg.penalty, chosen=chosen)


def chain_leaves(root: tree.Node) -> list[tree.Node]:
    """The leaf that ends each of the M original chains (the leftmost leaf of each tree), so
    accuracy can be compared with ChainRL on the same footing."""
    return [tree.leaves(top)[0] for top in tree.trees(root)]


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

    lr: float = arg(3e-5, "AdamW learning rate of the RL stage")
    lr_warmup_ratio: float = arg(0.0, "linear learning-rate warm-up over this share of --steps (the release: 0.05)")
    lr_warmup_steps: int = arg(0, "linear learning-rate warm-up over this many optimizer steps")
    adam_beta2: float = arg(0.999, "AdamW beta2 (the release: 0.95)")
    weight_decay: float = arg(0.0, "AdamW weight decay (the release: 0.1)")
    train_temperature: float = arg(0.0, "temperature of the log-probs in the loss (0: the sampling one)")
    clip_low: float = arg(0.2, "ratio clip below: 1 - clip_low")
    clip_high: float = arg(0.28, "ratio clip above: 1 + clip_high (DAPO's clip-higher)")
    aggregation: Literal["token", "sequence"] = arg("token", "loss mean over all tokens (DAPO) or per response (GRPO)")
    kl_coef: float = arg(0.0, "weight of the k3 KL to the frozen starting policy (0: none loaded)")
    ppo_epochs: int = arg(1, "passes over each rollout")
    mini_batch_size: int = arg(0, "sequences per optimizer step (0: the whole rollout in one step)")
    micro_batch_size: int = arg(64, "sequences per forward/backward (gradient accumulation bounds memory)")
    micro_batch_tokens: int = arg(0, "at most this many positions, padding included, per forward/backward (0: any)")
    max_grad_norm: float = arg(1.0, "gradient clipping by global norm")
    log_grad_parts: bool = arg(
        False, "log the policy-gradient and KL gradient norms apart (with a KL: a backward more)"
    )
    pack_tree: bool = arg(True, "each token of a forest through the model once (packing.TreeLayout)")

    def validate(self) -> None:
        check_choices(self, UpdateConfig)
        for name in ("lr", "micro_batch_size", "ppo_epochs", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0; got {getattr(self, name)}")
        for name in ("clip_low", "clip_high", "kl_coef", "mini_batch_size", "micro_batch_tokens", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if self.train_temperature < 0:
            raise ValueError(f"--train_temperature must be >= 0; got {self.train_temperature}")
        if not (0 <= self.lr_warmup_ratio < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("--lr_warmup_ratio and --adam_beta2 must be in [0, 1)")
        if self.lr_warmup_steps < 0 or (self.lr_warmup_steps and self.lr_warmup_ratio):
            raise ValueError(
                f"--lr_warmup_steps must be >= 0 and not set with --lr_warmup_ratio; got "
                f"{self.lr_warmup_steps} steps, ratio {self.lr_warmup_ratio}"
            )
        if self.clip_low >= 1:
            raise ValueError(f"--clip_low must be < 1 (the ratio is clipped at 1 - clip_low); got {self.clip_low}")


def optimizer_for(model, cfg: UpdateConfig, steps: int):
    """AdamW with cfg's settings, and its learning-rate schedule: a linear warm-up over
    `lr_warmup_steps` optimizer steps, or `lr_warmup_ratio` of `steps` (one optimizer step per RL
    step with the defaults), then constant. A warm-up keeps Adam's first steps, whose moment
    estimates hold only one or a few noisy gradients, from moving every weight by the full rate."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    warmup = cfg.lr_warmup_steps or math.ceil(cfg.lr_warmup_ratio * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, schedule


# The loss sees a micro-batch only through per-token tensors. A *position* of a micro-batch stands
# for one or more (leaf, response token) pairs of the rollout: in the flat layout below exactly
# one (every leaf is its own row), in the tree-packed layout (packing.py) every leaf that shares
# the token. Each pair carries its leaf's advantage A and an aggregation weight w
# (`logprobs.aggregation_weight`):
#
#     token aggregation (DAPO):    w = 1,             loss = sum of w * f / response tokens
#     sequence aggregation (GRPO): w = 1 / |o_leaf|,  loss = sum of w * f / responses
#
# with f(rho, A) = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)) the clipped
# surrogate. f is positively homogeneous in A, so w * f(rho, A) = f(rho, w * A): a batch hands the
# loss the *weighted* advantages w * A, in K columns whose surrogates add up (one column in the
# flat layout, `logprobs.Batch`; in the packed one, the pairs of each advantage sign summed, which
# is exact, and a third column for pairs with A = 0, which count in the statistics only).


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
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


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    batch,
    denominator: float,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate on per-token advantages (PPO's objective with GRPO's group advantages).

    per position:  sum over columns k of  max(-A_k * rho, -A_k * clip(rho, 1 - clip_low, 1 + clip_high)),
                   rho = pi / pi_old, A_k the batch's weighted advantages (the comment above `clipped_surrogate`),
                   plus kl_coef * w * (exp(ref - logp) - (ref - logp) - 1)   (the k3 KL estimator)
    loss:          sum over positions / denominator

    `denominator` is the number of response tokens (token aggregation) or of responses (sequence
    aggregation) of the whole mini-batch, so that its micro-batches add up to its loss under
    gradient accumulation. `batch` is any layout's micro-batch (`logprobs.Batch`, `packing.PackedBatch`).
    Statistics are means over the (leaf, token) pairs.
    """
    ratio = torch.exp(logp - old_logp)[..., None]  # one ratio for every column
    per_column, was_clipped = clipped_surrogate(ratio, batch.advantages, clip_low, clip_high)
    per_token = per_column.sum(-1)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl * batch.weight
    loss = per_token.sum() / max(denominator, 1.0)
    count = batch.pairs.sum(-1)  # pairs behind each position
    n = count.sum().clamp(min=1)
    stats = {
        "clip_frac": float((was_clipped * batch.pairs).sum() / n),
        "kl": float((kl.detach() * count).sum() / n),
        "ratio": float((ratio[..., 0].detach() * count).sum() / n),
    }
    return loss, stats


class Layout(Protocol):
    """How a rollout's training sequences go through the model, in *units* (one row each of the
    per-token tensors of a micro-batch): `FlatLayout` here (a unit is a leaf's sequence) or
    `packing.TreeLayout` (a unit is a tree: each token of a forest through the model once)."""

    leaves: list[int]  # training sequences (leaves) per unit: what mini/micro-batch sizes count
    tokens: list[int]  # response tokens per unit: token aggregation's denominator
    lengths: list[int]  # positions per unit (its row's length in a micro-batch)
    groups: list[list[int]]  # units that go into the same mini-batch (a forest's trees)

    def micro_batches(self, units: list[int], size: int, tokens: int = 0) -> list[list[int]]:
        """`units` cut into micro-batches of about `size` leaves and, with `tokens`, at most that
        many positions, padding included (a unit longer than that alone)."""

    def batch(self, units: list[int], device) -> logprobs.Batch:
        """The micro-batch of `units` (row r is units[r]) with `logprobs(model, temperature)`."""


class FlatLayout:
    """Every training sequence its own row, prompt and shared prefixes included (`logprobs.collate`)."""

    def __init__(self, sequences: Sequence[tree.TrainSequence], aggregation: str, pad_token_id: int):
        self.sequences, self.aggregation, self.pad_token_id = sequences, aggregation, pad_token_id
        self.leaves = [1] * len(sequences)
        self.tokens = [len(s.response_ids) for s in sequences]
        self.lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in sequences]
        self.groups = [[k] for k in range(len(sequences))]

    def micro_batches(self, units: list[int], size: int, tokens: int = 0) -> list[list[int]]:
        runs: list[list[int]] = []
        for k in units:  # in order, `size` at a time, fewer where their padded rows pass `tokens`
            run = runs[-1] if runs else []
            longest = max([self.lengths[j] for j in run] + [self.lengths[k]])
            if run and len(run) < size and (not tokens or (len(run) + 1) * longest <= tokens):
                run.append(k)
            else:
                runs.append([k])
        return runs

    def batch(self, units: list[int], device) -> logprobs.Batch:
        return logprobs.collate([self.sequences[k] for k in units], self.pad_token_id, self.aggregation, device)


def group_by_size(items: Sequence[int], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive runs of `items` whose `sizes[item]` add up to at most `limit` (an item larger than
    the limit gets a run of its own): mini-batches of whole groups."""
    runs: list[list[int]] = []
    total = 0
    for item in items:
        if runs and total + sizes[item] <= limit:
            runs[-1].append(item)
            total += sizes[item]
        else:
            runs.append([item])
            total = sizes[item]
    return runs


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the accumulated gradient, step, advance the schedule; returns the gradient norm. The
    gradient is freed at once, not held (a copy of the weights' size) through the rollout and
    evaluation that follow."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return float(grad_norm)


def one_step_per_rollout(cfg: UpdateConfig, leaves: int) -> bool:
    """Whether the update takes a single optimizer step on the rollout (one epoch, one mini-batch):
    then the policy that sampled is the one being differentiated, and the ratio is exactly 1."""
    return cfg.ppo_epochs == 1 and (cfg.mini_batch_size == 0 or cfg.mini_batch_size >= leaves)


def update(
    model,
    optimizer,
    scheduler,
    sequences: Sequence[tree.TrainSequence],
    cfg: UpdateConfig,
    pad_token_id: int,
    temperature: float = 1.0,
    ref_model=None,
    seed: int = 0,
    layout: Callable[..., Layout] = FlatLayout,
) -> dict[str, float]:
    """One rollout's worth of policy optimisation; returns averaged statistics.

    The old log-probs are recomputed here with the current weights, in the mode the update runs in
    (not taken from the sampler, whose numerics may differ, e.g. vLLM's kernels): the ratio starts
    at exactly 1. So with one epoch and the whole rollout in one mini-batch (the defaults, and the
    release's setting) the ratio is 1, the clip never acts, and the step is REINFORCE on the
    per-token advantages. In that case the old log-probs *are* the new ones, detached, and the
    forward pass that would compute them is skipped (a third of the update's work).
    `temperature` is that of the log-probs (UpdateConfig.train_temperature). `layout` lays the
    sequences out for the model: `FlatLayout`, or `packing.TreeLayout` (train.py's --pack_tree).
    Mini-batches hold whole groups of units (the packed layout's forests), in random order.
    """
    model.train()
    device = next(model.parameters()).device
    units = layout(sequences, cfg.aggregation, pad_token_id)

    def per_unit(m) -> list[torch.Tensor]:  # log-probs of every unit under model m, one tensor each
        out = [torch.empty(0)] * len(units.leaves)
        for ids in units.micro_batches(list(range(len(out))), cfg.micro_batch_size, cfg.micro_batch_tokens):
            logp = units.batch(ids, device).logprobs(m, temperature)
            for row, k in enumerate(ids):
                out[k] = logp[row, : units.lengths[k]]
        return out

    def padded(per_unit_logp, ids):  # per-unit log-probs laid out like units.batch(ids)
        return torch.nn.utils.rnn.pad_sequence([per_unit_logp[k] for k in ids], batch_first=True)

    with torch.no_grad():
        old_logp = None  # one optimizer step on the rollout: old = new, detached
        if not one_step_per_rollout(cfg, len(sequences)):
            old_logp = per_unit(model)
        ref_logp = None
        if ref_model is not None and cfg.kl_coef > 0:
            ref_logp = per_unit(ref_model)

    group_leaves = [sum(units.leaves[k] for k in group) for group in units.groups]
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(units.groups), generator=generator).tolist()
        for mini in group_by_size(order, group_leaves, cfg.mini_batch_size or len(sequences)):
            mini = [k for g in mini for k in units.groups[g]]
            tokens = sum(units.tokens[k] for k in mini)
            denominator = tokens if cfg.aggregation == "token" else sum(units.leaves[k] for k in mini)
            optimizer.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio": 0.0}
            kl_grad = None  # with --log_grad_parts and a KL: the KL term's own gradient
            for ids in units.micro_batches(mini, cfg.micro_batch_size, cfg.micro_batch_tokens):
                b = units.batch(ids, device)
                logp = b.logprobs(model, temperature)
                old = logp.detach() if old_logp is None else padded(old_logp, ids)
                ref = None if ref_logp is None else padded(ref_logp, ids)
                loss, stats = policy_loss(logp, old, b, denominator, cfg.clip_low, cfg.clip_high, ref, cfg.kl_coef)
                if cfg.log_grad_parts and ref is not None:
                    term = cfg.kl_coef * (k3_kl(logp, ref) * b.weight).sum() / max(denominator, 1.0)
                    kl_grad = probes.add_kl_gradient(kl_grad, model, term)
                loss.backward()
                # The micro-batch losses add up to the mini-batch's; its means weigh by its share of tokens.
                share = sum(units.tokens[k] for k in ids) / max(tokens, 1)
                sums["loss"] += loss.item()
                for key in ("clip_frac", "kl", "ratio"):
                    sums[key] += stats[key] * share
            if cfg.log_grad_parts:  # how hard each term pulls: the KL's pull against the policy gradient's
                sums.update(probes.gradient_parts(model, kl_grad))
            sums["grad_norm"] = optimizer_step(model, optimizer, scheduler, cfg.max_grad_norm)
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    return {key: value / steps for key, value in totals.items()}
