"""TreeRL inside TRL: EPTree rollouts and process advantages in TRL's `GRPOTrainer`.

Skip this file on a first reading: it is how TreeRL scales out (several GPUs, DeepSpeed / FSDP,
TRL's vLLM server), not part of the algorithm, which it takes from tree.py and treerl.py.

For users who have outgrown one GPU and want TRL's engine (`accelerate launch`, DeepSpeed / FSDP,
vLLM generation, its loss variants, logging and checkpoints) with TreeRL's two ideas. Exactly two
things of a TRL GRPO step change; everything else is TRL's code, untouched:

1. **Sampling.** TRL samples G independent completions per prompt. Here each prompt grows an EPTree
   forest (`tree.eptree_batch`, Algorithm 1 of the paper) and the forest's leaves become that
   prompt's G completions. Each sampling call of the search goes through TRL's own generation path
   (`GRPOTrainer._generate_single_turn`: transformers `generate`, or TRL's vLLM client / colocated
   vLLM), so generation settings, weight sync to vLLM and ZeRO-3 parameter gathering stay TRL's.
   The fork score (entropy of the tempered policy at each token) comes from TRL's own fused
   log-prob / entropy head (`_get_per_token_logps_and_entropies`), one extra no-grad forward per
   sampling call.
2. **Advantages.** TRL gives each completion one outcome advantage, shape [B]. Here every token of a
   completion carries the process reward R(s) of the tree segment it belongs to
   (`tree.process_rewards`, Eqs. 2-4), shape [B, T]. TRL 1.16's `_compute_loss` already accepts
   [B, T] advantages (it unsqueezes only a 1-D tensor), so no loss code is overridden: clipping,
   `loss_type` (dapo, grpo, dr_grpo, bnpo, cispo, ...), KL to a reference, vLLM importance-sampling
   correction and metrics all act on the per-token advantages as they are.

One training step, per process::

    TRL's sampler: P prompts, each repeated G times (G = num_generations)
      └─► TreeRLTrainer._generate_and_score_completions
            tree.eptree_batch(P prompts, sample_fn)          sample_fn = TRL generation + entropy
            TRL reward functions on every leaf                (GRPOTrainer._calculate_rewards)
            tree.process_rewards per forest ─► tree.to_sequences: G rows per prompt
            GRPOTrainer._generate_and_score_completions(...)  with its sampling and its rewards
                                                              answered from the forests above
            advantages [B] ─► per-token R(s) [B, T]
      └─► TRL: shuffle, split into micro-batches, _compute_loss, optimizer, logging, checkpoints

Rows per prompt. TRL's batches are built of groups of G = `num_generations` rows per prompt. A
forest has M * (1 + L * N * T) leaves when every tree has N tokens to fork at, and that is the
default G. A forest with more leaves than G trains a random G of them (`tree.to_sequences(keep=G)`,
what the official release does with 16 of 30); one with fewer (a tree ran out of fork points)
fills its group with copies of its first leaf whose loss mask is 0. Forests whose leaves all got
the same reward carry no signal (every R(s) is 0) and are masked out of the loss too, as
`treerl.rollout` skips them (`mask_zero_signal`).

With L = 0 (no forks) the forest is M independent chains and R = GA + LA = 2 (r - mean): exactly
twice TRL's advantage with Dr. GRPO's settings (`scale_rewards="none"`), and exactly TRL's with
`use_local=False` (tests/test_trl_treerl.py checks both), given the same rewards: a leaf that never
ended scores 0 here (as in train.py), whatever the reward function says.

What is not supported (a clear error says so): tools, environments, `rollout_func`, images. The
evaluation loop (`eval_strategy`) keeps TRL's plain sampling and GRPO advantages.

TRL is optional: `pip install -r requirements-trl.txt`. This module overrides or calls TRL's
private `_generate_and_score_completions`, `_generate_single_turn`, `_tokenize_prompts`,
`_calculate_rewards` and `_get_per_token_logps_and_entropies`, so it is pinned to the TRL version it
was tested with (TESTED_TRL); another version gets a warning, or an error when a hook is missing.

Command line (see docs/trl.md)::

    python trl_treerl.py --output_dir runs/trl_treerl                     # tiny CPU model, arithmetic
    accelerate launch --num_processes 8 trl_treerl.py --model Qwen/Qwen2.5-Math-1.5B --task math ...
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import trl
    from accelerate.utils import gather
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import pad
except ImportError as error:  # TRL is optional: nothing else in the project needs it
    raise ImportError(
        "trl_treerl needs TRL, an optional dependency of this project. Install it with "
        "`pip install -r requirements-trl.txt` (tested with trl==1.16.0). "
        f"Import failed with: {error}"
    ) from error

import rewards
import tree
import treerl

TESTED_TRL = "1.16.0"

# The TRL methods this module overrides or calls. They are private, so check they exist up front
# rather than fail in the middle of a run.
_TRL_HOOKS = (
    "_generate_and_score_completions",
    "_generate_single_turn",
    "_tokenize_prompts",
    "_calculate_rewards",
    "_get_per_token_logps_and_entropies",
)
_missing = [name for name in _TRL_HOOKS if not hasattr(GRPOTrainer, name)]
if _missing:
    raise ImportError(
        f"trl {trl.__version__} has no GRPOTrainer.{_missing[0]}, which trl_treerl relies on; "
        f"install the tested version: pip install -r requirements-trl.txt (trl=={TESTED_TRL})"
    )
if trl.__version__ != TESTED_TRL:
    warnings.warn(
        f"trl_treerl was tested with trl=={TESTED_TRL}; you have {trl.__version__}. It overrides "
        "private GRPOTrainer methods, so check tests/test_trl_treerl.py passes.",
        stacklevel=2,
    )


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class TreeRLConfig(GRPOConfig, treerl.TreeConfig):
    """TRL's `GRPOConfig` plus EPTree's (M, N, L, T) and the process-reward switches, declared once
    in `treerl.TreeConfig` (train.py's command line has the same ones).

    Every other setting is TRL's: learning rate, `loss_type`, `epsilon` / `epsilon_high` (the clip),
    `beta` (KL), `temperature`, `max_completion_length`, `use_vllm`, batch sizes, logging, saving.
    `truncated_penalty` left at nan lets the reward function decide what a response that never
    ended gets.
    """

    answer_markers: list[str] = field(
        default_factory=lambda: list(rewards.ANSWER_MARKERS),
        metadata={"help": "text after which the final answer starts; EPTree never forks inside it"},
    )
    mask_zero_signal: bool = field(
        default=True,
        metadata={
            "help": "leave forests whose leaves all have the same reward out of the loss (their advantages are all 0), as treerl.rollout does"
        },
    )
    # Redefined: TRL's default is 8; here it defaults to the size of a full forest.
    num_generations: int | None = field(
        default=None,
        metadata={
            "help": "training rows per prompt, i.e. leaves kept per forest (default M*(1+L*N*T), the whole forest)"
        },
    )

    def __post_init__(self):
        for name in ("M", "N", "L", "T", "skip_last"):
            value = getattr(self, name)
            if int(value) != value:
                raise ValueError(f"TreeRLConfig.{name} must be an integer, got {value!r}")
        try:
            self.validate()
        except ValueError as error:
            raise ValueError(f"TreeRLConfig: {error}") from None
        if self.num_generations is None:
            self.num_generations = self.forest_size
        super().__post_init__()  # TRL derives the generation batch from num_generations


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class _Rollout:
    """What the forests hand to TRL's own `_generate_and_score_completions` for one step: the
    completion of every row, its sampler log-probs (vLLM only) and its rewards per function."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    rewards_per_func: torch.Tensor  # [rows, reward functions]; NaN on padding rows


class TreeRLTrainer(GRPOTrainer):
    """`GRPOTrainer` with EPTree rollouts and TreeRL's per-token process advantages.

    Use it like `GRPOTrainer`, with a `TreeRLConfig`::

        trainer = TreeRLTrainer(model, reward_funcs=arith_reward_func, args=TreeRLConfig(...),
                                train_dataset=Dataset.from_dict({"prompt": [...], "answer": [...]}))
        trainer.train()
    """

    _tag_names = ["trl", "grpo", "treerl"]
    _name = "TreeRL"

    def __init__(self, model, reward_funcs=None, args: TreeRLConfig | None = None, **kwargs):
        if args is None:
            args = TreeRLConfig(output_dir="TreeRL")
        if not isinstance(args, TreeRLConfig):
            raise TypeError(f"TreeRLTrainer needs args=TreeRLConfig(...), got {type(args).__name__}")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name):
                raise NotImplementedError(
                    f"TreeRLTrainer does not support `{name}`: EPTree forks plain single-turn completions"
                )
        per_process = args.per_device_train_batch_size * args.steps_per_generation
        if per_process % args.num_generations:
            raise ValueError(
                f"TreeRLTrainer grows each prompt's forest on one process, so every process needs whole "
                f"groups: per_device_train_batch_size * steps_per_generation ({per_process}) must be a "
                f"multiple of num_generations ({args.num_generations})"
            )
        super().__init__(model, reward_funcs=reward_funcs, args=args, **kwargs)
        if self._is_vlm:
            raise NotImplementedError("TreeRLTrainer does not support vision-language processors")
        self._rollout: _Rollout | None = None  # set only while TRL's step code runs, see below
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        answer_start = treerl.answer_start_fn(decode, args.answer_markers) if args.answer_markers else None
        self._fork_candidates = args.fork_candidates(decode, answer_start)  # where a tree may fork
        self._sampled_tokens = 0  # tokens TRL generated for this step's search
        self.last_forests: list[tree.Node] = []  # this process's forests of the latest step, to inspect

    # ---- the step ---------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # evaluation: TRL's own sampling and advantages
            return super()._generate_and_score_completions(inputs)
        G = self.num_generations
        # TRL's sampler repeats every prompt G times in a row; the search needs each prompt once.
        prompts = [inputs[i]["prompt"] for i in range(0, len(inputs), G)]
        prompt_ids, _, _ = self._tokenize_prompts(prompts)

        self._sampled_tokens = 0
        forests = self._grow_forests(prompt_ids)
        leaf_rewards = self._score_leaves(inputs, prompts, forests)
        rows, masked, padding = self._rows(forests)

        # Run TRL's own step code on those rows. Its two calls that would sample and score afresh,
        # `_generate_single_turn` and `_calculate_rewards`, answer from `self._rollout` (see the
        # overrides below); everything else (padding, old / reference log-probs, the vLLM
        # importance-sampling ratio, truncation masking, metrics) is TRL's. Padding rows get NaN
        # rewards, which TRL's reward statistics leave out.
        nan = torch.full((len(self.reward_funcs),), float("nan"), device=self.accelerator.device)
        self._rollout = _Rollout(
            completion_ids=[row.response_ids for row in rows],
            logprobs=[row.logprobs for row in rows] if self.use_vllm else None,
            rewards_per_func=torch.stack([nan if p else leaf_rewards[row.leaf] for row, p in zip(rows, padding)]),
        )
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout = None

        # TRL's advantages are one number per row, [B]; replace them by R(s) on every token, [B, T].
        # Rows are in the order we gave them (TRL shuffles later, in _prepare_inputs), and TRL
        # right-pads completions, so token j of row i is column j.
        device = output["completion_ids"].device
        advantages = torch.zeros(output["completion_ids"].shape, device=device)
        for i, row in enumerate(rows):
            advantages[i, : len(row.advantages)] = torch.tensor(row.advantages, device=device)
        keep = torch.tensor([not m for m in masked], device=device).unsqueeze(1)
        output["completion_mask"] = output["completion_mask"] * keep
        output["advantages"] = advantages * keep
        # The token count that the dapo / cispo losses divide by must leave the masked rows out.
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        self._log_tree_metrics(forests, output["advantages"], loss_mask, sum(padding))
        self.last_forests = forests
        return output

    def _generate_single_turn(self, *args, **kwargs):
        if self._rollout is not None:  # inside our step: the completions are the forests' leaves
            return self._rollout.completion_ids, self._rollout.logprobs
        return super()._generate_single_turn(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._rollout is not None:  # inside our step: the leaves were scored already
            return gather(self._rollout.rewards_per_func)  # TRL's contract: all processes' rows
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    # ---- EPTree through TRL's generation ----------------------------------------------------------

    def _grow_forests(self, prompt_ids: list[list[int]]) -> list[tree.Node]:
        """One EPTree forest per prompt (tree.eptree_batch): one sampling call for the M chains of
        every prompt, then one per forking round."""
        args = self.args
        calls = 0

        def sample_fn(prefixes, n, budgets):
            # TRL generates every row up to max_completion_length; eptree_batch cuts each branch
            # to what its fork leaves of that budget.
            nonlocal calls
            calls += 1
            return self._sample(prefixes, n, fallback=prompt_ids[0])

        seed = (args.seed * 1_000_003 + self.state.global_step) * 1_009 + self.accelerator.process_index
        forests = tree.eptree_batch(
            prompt_ids,
            sample_fn,
            args.M,
            args.N,
            args.L,
            args.T,
            fork_score=args.fork_score,
            candidates=self._fork_candidates,
            seed=seed,
            max_response_tokens=self.max_completion_length,
            full_length_branches=args.full_length_branches,
        )
        if self.accelerator.num_processes > 1:
            # eptree_batch stops early when no tree of this process has a token left to fork at,
            # but generation can be collective (vLLM server mode gathers prompts, ZeRO-3 gathers
            # weights): make the calls the other processes are still making, with nothing to add.
            rounds = args.L if args.N and args.T else 0
            while calls < 1 + rounds:
                sample_fn([], args.T, None)
        return forests

    def _sample(self, prefixes: list[list[int]], n: int, fallback: list[int]) -> list[list[tree.Sample]]:
        """EPTree's sampler: n continuations of each prefix, with each token's log-prob and fork score.

        Rows go to TRL's `_generate_single_turn` as each prefix repeated n times, the layout TRL's
        vLLM client expects (it samples n per distinct prompt). With several processes, each pads its
        rows to the largest count with copies of `fallback`, because TRL's vLLM server and
        tensor-parallel paths slice the gathered rows into equal parts per process.
        """
        rows = [list(p) for p in prefixes for _ in range(n)]
        wanted = len(rows)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(torch.tensor([len(prefixes)], device=self.accelerator.device))
            most = int(counts.max())
            if most == 0:
                return []
            rows += [list(fallback)] * ((most - len(prefixes)) * n)
        completion_ids, sampler_logps = GRPOTrainer._generate_single_turn(self, rows, None, {}, n)
        completion_ids = [list(map(int, c)) for c in completion_ids]
        # What TRL generated, before the search cuts a branch to its budget: the cost of the step.
        self._sampled_tokens += sum(len(completion_ids[i]) for i in range(wanted))

        # Fork scores: only needed when forks are chosen by entropy or log-prob.
        logps = scores = None
        if self.args.L and self.args.N and self.args.T and self.args.fork_score != "random":
            logps, scores = self._score_tokens(rows, completion_ids)
        samples = []
        for i in range(wanted):
            ids = completion_ids[i]
            if sampler_logps is not None:  # vLLM's own log-probs: TRL's importance sampling uses them
                lps = [math.nan if x is None else float(x) for x in sampler_logps[i]]
            elif logps is not None:
                lps = logps[i]
            else:
                lps = [0.0] * len(ids)
            samples.append(
                tree.Sample(
                    ids,
                    lps,
                    scores[i] if scores is not None else [0.0] * len(ids),
                    finished=bool(ids) and ids[-1] in self.eos_token_ids,
                )
            )
        return [samples[k * n : (k + 1) * n] for k in range(len(prefixes))]

    @torch.no_grad()
    def _score_tokens(
        self, rows: list[list[int]], completion_ids: list[list[int]]
    ) -> tuple[list[list[float]], list[list[float]]]:
        """Log-prob of every sampled token and entropy of the distribution it was drawn from, both
        of softmax(logits / temperature) (the distribution TRL's loss uses), by TRL's own fused head."""
        width = max((len(c) for c in completion_ids), default=0)
        if width == 0:
            return [[] for _ in rows], [[] for _ in rows]
        pad_id, device = self._tokenizer.pad_token_id, self.accelerator.device
        as_tensors = lambda seqs: [torch.tensor(s, dtype=torch.long) for s in seqs]  # noqa: E731
        ones = lambda seqs: [torch.ones(len(s), dtype=torch.long) for s in seqs]  # noqa: E731
        input_ids = torch.cat(
            [
                pad(as_tensors(rows), padding_value=pad_id, padding_side="left"),
                pad(as_tensors(completion_ids), padding_value=pad_id, padding_side="right"),
            ],
            1,
        )
        attention = torch.cat(
            [
                pad(ones(rows), padding_value=0, padding_side="left"),
                pad(ones(completion_ids), padding_value=0, padding_side="right"),
            ],
            1,
        )
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids.to(device),
                attention.to(device),
                width,
                batch_size=self.args.per_device_train_batch_size,
                compute_entropy=True,
            )
        logps, entropies = logps.float().cpu(), entropies.float().cpu()
        return (
            [logps[i, : len(c)].tolist() for i, c in enumerate(completion_ids)],
            [entropies[i, : len(c)].tolist() for i, c in enumerate(completion_ids)],
        )

    # ---- rewards and rows -------------------------------------------------------------------------

    def _score_leaves(self, inputs, prompts, forests) -> dict[tree.Node, torch.Tensor]:
        """Every leaf's reward from TRL's reward functions (so any TRL reward function works), summed
        with TRL's `reward_weights` into `leaf.reward`; returns each leaf's per-function rewards.

        A leaf is scored with its prompt's dataset row (extra columns such as `answer` reach the
        reward function as keyword arguments, as in TRL). A leaf that every function declines (None)
        counts as reward 0.
        """
        G = self.num_generations
        owners = [(k, leaf) for k, root in enumerate(forests) for leaf in tree.leaves(root)]
        ids = [tree.response_tokens(leaf) for _, leaf in owners]
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        rows = [inputs[k * G] for k, _ in owners]
        row_prompts = [prompts[k] for k, _ in owners]
        count = most = len(owners)
        if self.accelerator.num_processes > 1:
            # TRL's _calculate_rewards gathers every process's rows, which needs equal counts.
            most = int(self.accelerator.gather(torch.tensor([count], device=self.accelerator.device)).max())
            extra = most - count
            rows, row_prompts = rows + rows[:1] * extra, row_prompts + row_prompts[:1] * extra
            completions, ids = completions + completions[:1] * extra, ids + ids[:1] * extra
        per_func = GRPOTrainer._calculate_rewards(self, rows, row_prompts, completions, ids)
        start = self.accelerator.process_index * most
        per_func = per_func[start : start + count]
        # Per-row columns logged by reward functions (log_extra) would not line up with the rows
        # TRL logs later: drop them.
        self._pending_extra_logs.clear()
        total = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        for (_, leaf), value in zip(owners, total.tolist()):
            # As in treerl.rollout (and the paper): a response that never ended scores 0.
            leaf.reward = float(value) if leaf.finished else 0.0
        return {leaf: per_func[i] for i, (_, leaf) in enumerate(owners)}

    def _rows(self, forests) -> tuple[list[tree.TrainSequence], list[bool], list[bool]]:
        """G training rows per forest, with the per-token advantages R(s) of Eqs. 2-4; which rows are
        left out of the loss (padding, and forests without signal); which rows are padding."""
        args, G = self.args, self.num_generations
        rows, masked, padding = [], [], []
        for k, root in enumerate(forests):
            found = tree.leaves(root)
            chosen = tree.pick_leaves(
                root,
                keep=G if len(found) > G else None,
                rng=random.Random((args.seed * 1_000_003 + self.state.global_step) * 1_009 + k),
            )
            advantages = args.process_rewards(root, chosen)
            sequences = tree.to_sequences(root, advantages, truncated_penalty=args.penalty, chosen=chosen)
            silent = (
                args.mask_zero_signal
                and len({leaf.reward for leaf in found}) == 1
                and (args.penalty is None or all(leaf.finished for leaf in found))
            )
            rows += sequences + sequences[:1] * (G - len(sequences))
            masked += [silent] * len(sequences) + [True] * (G - len(sequences))
            padding += [False] * len(sequences) + [True] * (G - len(sequences))
        return rows, masked, padding

    def _log_tree_metrics(self, forests, advantages, loss_mask, padded: int) -> None:
        found = [leaf for root in forests for leaf in tree.leaves(root)]
        silent = sum(len({leaf.reward for leaf in tree.leaves(root)}) == 1 for root in forests)
        local = torch.tensor(
            [self._sampled_tokens, len(found), len(forests), silent, padded, sum(leaf.reward for leaf in found)],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        tokens, leaves, prompts, silent, padded, reward = self.accelerator.gather(local).view(-1, 6).sum(0).tolist()
        metrics = self._metrics["train"]
        metrics["tree/generated_tokens"].append(tokens)  # sampled by TRL for the search, all processes
        metrics["tree/leaves_per_prompt"].append(leaves / prompts)
        metrics["tree/leaf_reward"].append(reward / leaves)
        metrics["tree/zero_signal_frac"].append(silent / prompts)
        metrics["tree/padded_rows"].append(padded)
        # TRL logs each row's (GRPO) advantage for its completions table: log the mean R(s) instead.
        row_mean = (advantages * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)
        gathered = self.accelerator.gather(row_mean).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(len(gathered), len(logged))):
            logged.pop()
        logged.extend(gathered)


# --------------------------------------------------------------------------------------------------
# rewards.py verifiers as TRL reward functions
# --------------------------------------------------------------------------------------------------
# TRL calls a reward function with the prompts, the completions and every other dataset column as
# keyword arguments, and wants one float (or None) per completion. Any TRL reward function works with
# TreeRLTrainer; these wrap this project's verifiers.


def _text(completion) -> str:
    """A completion's text: TRL passes plain strings, or a list of messages for chat datasets."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def arith_reward_func(completions, answer, **kwargs) -> list[float]:
    """rewards.arith_reward: 1.0 iff the text after the last "Answer:" is the gold integer.
    Needs an `answer` column."""
    return [rewards.arith_reward(_text(c), gold) for c, gold in zip(completions, answer)]


def math_reward_func(completions, answer, **kwargs) -> list[float]:
    """rewards.math_rewards: the last \\boxed{} (or Answer:) equivalent to the gold, checked with
    math-verify under hard time limits. Needs an `answer` column."""
    return rewards.math_rewards([_text(c) for c in completions], [str(gold) for gold in answer])


def code_reward_func(completions, tests, **kwargs) -> list[float]:
    """rewards.code_reward: the completion's program passes every test, run sandboxed. Needs a
    `tests` column (see sandbox.run_tests for its format)."""
    return [rewards.code_reward(rewards.extract_program(_text(c)), t) for c, t in zip(completions, tests)]


REWARD_FUNCS = {
    "arith": arith_reward_func,
    "arith_chat": math_reward_func,
    "math": math_reward_func,
    "code": code_reward_func,
}


# --------------------------------------------------------------------------------------------------
# Data, and the command line (the same task and warm start as train.py)
# --------------------------------------------------------------------------------------------------


def task_dataset(task, split: str = "train"):
    """A tasks.Task as the `datasets.Dataset` TRL reads: a `prompt` column of plain strings (chat
    templates are already applied by tasks.build_task) and the gold in `answer` (or `tests`)."""
    from datasets import Dataset

    examples = task.train if split == "train" else task.eval
    gold = "tests" if task.name == "code" else "answer"
    return Dataset.from_dict(
        {
            "prompt": [e.prompt for e in examples],
            gold: [e.gold if task.name == "code" else str(e.gold) for e in examples],
        }
    )


@dataclass
class ScriptArguments:
    """The policy; the task is tasks.TaskConfig's flags (--task, --data, --problem_field, ...), and
    everything about training is TreeRLConfig (TRL's flags plus EPTree's)."""

    model: str = field(
        default="",
        metadata={"help": "hub id or local path of a causal LM; empty: train.py's tiny CPU model, warm-started"},
    )
    warm_start_steps: int = field(
        default=600,
        metadata={
            "help": "tiny model only: supervised warm-start steps (train.py's --warmup_steps; TRL's --warmup_steps is the learning-rate warm-up)"
        },
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})


# train.py's CPU default (configs/cpu_default.yaml) as TRL flags: 16 prompts x 20 leaves per step in
# one optimizer step, constant learning rate 3e-5, clip [0.8, 1.28] with token-level averaging
# (TRL's default loss_type "dapo"), at most 64 new tokens, 120 steps, no gradient checkpointing (TRL
# turns it on by default; a model this small needs no memory saved, and the forward pass it runs
# again in the backward only costs time). Used for the tiny model, for every flag the command line
# does not give.
CPU_DEFAULT_FLAGS = {
    "--output_dir": "runs/trl_treerl",
    "--learning_rate": "3e-5",
    "--lr_scheduler_type": "constant",
    "--epsilon_high": "0.28",
    "--max_completion_length": "64",
    "--max_steps": "120",
    "--per_device_train_batch_size": "80",
    "--gradient_accumulation_steps": "4",
    "--logging_steps": "1",
    "--save_steps": "20",
    "--gradient_checkpointing": "false",
    "--seed": "0",  # train.py's (TRL's is 42); the warm start and data depend on it
}


def main(argv: list[str] | None = None):
    from transformers import AutoTokenizer, HfArgumentParser

    import policy
    import tasks

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {} if "--model" in argv else dict(CPU_DEFAULT_FLAGS)
    if not torch.cuda.is_available():
        # TRL turns bf16 on by default: a CPU run stays in float32. use_cpu also lets torchrun start
        # several CPU processes (gloo), which is how the multi-process code was checked without GPUs.
        defaults.update({"--bf16": "false", "--use_cpu": "true"})
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    script, config, rest = HfArgumentParser((ScriptArguments, TreeRLConfig)).parse_args_into_dataclasses(
        argv, return_remaining_strings=True
    )
    # The task's flags, parsed from what TRL left (TRL's --data_seed is its own; the task's stays 0).
    (task_cfg,) = HfArgumentParser(tasks.TaskConfig).parse_args_into_dataclasses(rest)
    task_cfg.validate()
    policy_cfg = policy.PolicyConfig(model=script.model, warmup_steps=script.warm_start_steps)
    policy_cfg.validate()
    train_size = tasks.arith_train_size(policy_cfg.warmup_steps * policy_cfg.warmup_batch_size, 0)
    if script.model:  # TRL loads the model itself (model_init_kwargs), so every process does it its way
        with config.main_process_first(desc="model"):  # a packaged model or GGUF file is converted once
            model = policy.resolve_model(script.model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        task = tasks.build_task(task_cfg, tokenizer, train_size)
    else:  # the main process warm-starts and caches; the others then load the cache
        with config.main_process_first(desc="warm start"):
            model, tokenizer, task = policy.warm_started_policy(
                policy_cfg,
                task_cfg,
                config.seed,
                Path(config.output_dir) / "warmstart",
                policy.pick_device(policy_cfg),
                train_size,
            )
    if "--answer_markers" not in argv:  # the task's own markers, as train.py uses them
        config.answer_markers = list(task.answer_markers)
    trainer = TreeRLTrainer(
        model,
        reward_funcs=REWARD_FUNCS[task_cfg.task],
        args=config,
        train_dataset=task_dataset(task),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=True if script.resume else None)
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
