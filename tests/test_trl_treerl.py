"""Tests for trl_treerl.py: TreeRL inside TRL's GRPOTrainer, on a tiny random model on the CPU.

Everything but the first test needs TRL (`pip install -r requirements-trl.txt`) and is skipped
without it; the vLLM test also needs vLLM (requirements-cpu-vllm.txt). The two-process and vLLM
checks run in their own processes (tests/trl_two_processes.py, tests/trl_vllm_colocate.py).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policy
import rewards
import tasks
import tree
import treerl

PROMPT, GOLD = "Compute 1+2+3.\n", "6"


def test_missing_trl_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "trl_treerl", raising=False)
    with pytest.raises(ImportError, match=r"requirements-trl\.txt"):
        importlib.import_module("trl_treerl")


@pytest.fixture(scope="module")
def ttr():
    pytest.importorskip("trl")
    import trl_treerl

    return trl_treerl


@pytest.fixture(scope="module")
def tokenizer():
    return policy.build_char_tokenizer()


def tiny_model(tokenizer):
    """A fresh ~20k-parameter Llama-style model, the same weights every call (seeded)."""
    model = policy.build_tiny_model(policy.PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    return model.train()


def digit_share(completions, **kwargs):
    """A user's own TRL reward function: the share of digits in the completion. Unlike the
    arithmetic verifier it varies on a random model's output, so every group carries signal."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(ttr, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        M=2,
        N=1,
        L=1,
        T=2,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_completion_length=24,
        learning_rate=1e-3,
        report_to="none",
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return ttr.TreeRLConfig(**settings)


def dataset(prompts, golds):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(prompts), "answer": list(golds)})


# --------------------------------------------------------------------------------------------------
# Training runs and changes the weights
# --------------------------------------------------------------------------------------------------


def test_a_few_training_steps_run_and_change_the_weights(ttr, tokenizer, tmp_path):
    task = tasks.build_task(tasks.TaskConfig(eval_size=8), tokenizer, train_size=8)
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = config(ttr, tmp_path, max_steps=3)
    assert args.num_generations == 2 * (1 + 1 * 1 * 2)  # a whole forest per prompt by default
    trainer = ttr.TreeRLTrainer(
        model,
        reward_funcs=[digit_share, ttr.arith_reward_func],
        args=args,
        train_dataset=ttr.task_dataset(task),
        processing_class=tokenizer,
    )
    trainer.train()
    changed = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    assert changed > 0
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logs)
    # The forests were real EPTree forests: chains forked, leaves scored, tokens counted.
    assert all(row["tree/leaves_per_prompt"] > 2 for row in logs)  # more than the M = 2 chains
    assert all(row["tree/generated_tokens"] > 0 for row in logs)
    forest = trainer.last_forests[0]
    assert all(leaf.reward is not None for leaf in tree.leaves(forest))
    assert any(not top.is_leaf for top in tree.trees(forest))  # at least one tree forked


# --------------------------------------------------------------------------------------------------
# The advantages TRL's loss receives are tree.process_rewards, token by token
# --------------------------------------------------------------------------------------------------

# A scripted sampler, so the forest is fixed. Keys: the response so far; values: the continuations
# it returns, each with the index of its one high-entropy token (where EPTree forks with
# fork_score="entropy"), or None.
SCRIPT = {
    "": [
        ("1+2=3\n3+3=6\nAnswer: 6", 4),  # right; forks before its first result digit
        ("1+2=4\n4+3=7\nAnswer: 7", 10),
    ],  # wrong; forks before its second result digit
    "1+2=": [("3\n3+3=5\nAnswer: 5", None), ("5\n5+3=8\nAnswer: 8", None)],
    "1+2=4\n4+3=": [("6\nAnswer: 6", None), ("8\nAnswer: 8", None)],
    # For the padding test: a chain with no token to fork at (it starts with the answer).
    "@": [("1+2=3\n3+3=6\nAnswer: 6", 4), ("Answer: 6", None)],
}


def scripted_sampler(tokenizer, prompt_ids, script=SCRIPT, first=""):
    eos = tokenizer.eos_token_id

    def sample(prefixes, n, budgets=None, fallback=None):
        groups = []
        for prefix in prefixes:
            so_far = tokenizer.decode(prefix[len(prompt_ids) :])
            group = []
            for text, peak in script[so_far or first]:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                scores = [0.0] * len(ids)
                if peak is not None:
                    scores[peak] = 5.0
                group.append(tree.Sample(ids, [0.0] * len(ids), scores, finished=True))
            assert len(group) == n
            groups.append(group)
        return groups

    return sample


def expected_forest(tokenizer, prompt_ids, sample):
    """The forest and its per-token advantages computed with tree.py alone, no TRL."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    root = tree.eptree_batch(
        [prompt_ids],
        sample,
        M=2,
        N=1,
        L=1,
        T=2,
        fork_score="entropy",
        candidates=tree.Forkable(4, treerl.answer_start_fn(decode, rewards.ANSWER_MARKERS)),
        max_response_tokens=24,
    )[0]
    for leaf in tree.leaves(root):
        leaf.reward = rewards.arith_reward(decode(tree.response_tokens(leaf)), GOLD)
    sequences = tree.to_sequences(root, tree.process_rewards(root))
    return root, {tuple(s.response_ids): s.advantages for s in sequences}


def test_loss_receives_the_process_rewards_of_the_forest_token_by_token(ttr, tokenizer, tmp_path):
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    sample = scripted_sampler(tokenizer, prompt_ids)
    root, expected = expected_forest(tokenizer, prompt_ids, sample)
    assert len(expected) == 6 and sum(leaf.reward for leaf in tree.leaves(root)) == 2
    # Not a trivial comparison: shared prefixes and tails carry different R(s) within one row.
    assert any(len(set(adv)) > 1 for adv in expected.values())

    trainer = ttr.TreeRLTrainer(
        tiny_model(tokenizer),
        reward_funcs=ttr.arith_reward_func,
        args=config(ttr, tmp_path, fork_score="entropy"),
        train_dataset=dataset([PROMPT], [GOLD]),
        processing_class=tokenizer,
    )
    trainer._sample = sample  # the only change: the scripted sampler instead of TRL's generate
    received = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):  # what TRL's loss gets, micro-batch by micro-batch
        received.append({k: inputs[k].detach().clone() for k in ("completion_ids", "completion_mask", "advantages")})
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()

    assert len(received) == 2  # 6 rows in 2 micro-batches of 3 (gradient accumulation)
    seen = []
    for batch in received:
        assert batch["advantages"].shape == batch["completion_ids"].shape  # [B, T], not TRL's [B]
        for ids, mask, advantages in zip(batch["completion_ids"], batch["completion_mask"], batch["advantages"]):
            n = int(mask.sum())
            response = tuple(ids[:n].tolist())
            want = torch.tensor(expected[response], dtype=advantages.dtype)
            torch.testing.assert_close(advantages[:n], want, rtol=0, atol=1e-6)
            assert advantages[n:].abs().sum() == 0 and mask[n:].sum() == 0
            seen.append(response)
    assert sorted(seen) == sorted(expected)  # every leaf exactly once


def test_short_forests_are_padded_and_silent_forests_masked(ttr, tokenizer, tmp_path):
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    other = "Compute 9-1-1.\n"  # gold 7: every scripted leaf is wrong there, no signal
    sample = scripted_sampler(tokenizer, prompt_ids, first="@")
    trainer = ttr.TreeRLTrainer(
        tiny_model(tokenizer),
        reward_funcs=ttr.arith_reward_func,
        args=config(ttr, tmp_path, per_device_train_batch_size=6, fork_score="entropy"),
        train_dataset=dataset([PROMPT, other], [GOLD, "7"]),
        processing_class=tokenizer,
    )
    trainer._sample = sample
    G = trainer.num_generations
    inputs = [{"prompt": PROMPT, "answer": GOLD}] * G + [{"prompt": other, "answer": "7"}] * G
    output = trainer._generate_and_score_completions(inputs)
    # Prompt 1: the first tree forks (3 leaves), the second has nothing to fork at (1 leaf): 4 leaves
    # in a group of 6, so 2 padding rows, out of the loss.
    lengths = output["completion_mask"].sum(1)
    assert [int(x > 0) for x in lengths[:G]] == [1, 1, 1, 1, 0, 0]
    # Prompt 2: all of its leaves are wrong, so all R(s) are 0 and the group is masked out.
    assert lengths[G:].sum() == 0 and output["advantages"][G:].abs().sum() == 0
    assert int(output["num_items_in_batch"]) == int(lengths.sum())
    assert output["advantages"].shape == output["completion_ids"].shape


# --------------------------------------------------------------------------------------------------
# L = 0 reproduces TRL's Dr. GRPO advantages (twice them; exactly them with GA only)
# --------------------------------------------------------------------------------------------------


def test_without_forks_the_advantages_are_dr_grpos_up_to_the_documented_factor(ttr, tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    drgrpo = dict(
        loss_type="dr_grpo",
        scale_rewards="none",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_completion_length=96,
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        output_dir=str(tmp_path),
    )
    prompts = [("Compute 1+2+3.\n", "6"), ("Compute 5-2+4.\n", "7")]
    data = dataset(*zip(*prompts))
    inputs = [{"prompt": p, "answer": a} for p, a in prompts for _ in range(4)]

    def digit_share_if_ended(completions, completion_ids, **kwargs):
        """digit_share, 0 for a completion that never ended: what TreeRLTrainer gives such a leaf
        whatever the reward function says, so plain TRL must see the same rewards."""
        ended = [len(ids) > 0 and ids[-1] == tokenizer.eos_token_id for ids in completion_ids]
        return [r if e else 0.0 for r, e in zip(digit_share(completions), ended)]

    plain = GRPOTrainer(
        tiny_model(tokenizer),
        reward_funcs=digit_share_if_ended,
        processing_class=tokenizer,
        args=GRPOConfig(num_generations=4, **drgrpo),
        train_dataset=data,
    )
    ours = ttr.TreeRLTrainer(
        tiny_model(tokenizer),
        reward_funcs=digit_share_if_ended,
        processing_class=tokenizer,
        args=ttr.TreeRLConfig(M=4, L=0, mask_zero_signal=False, **drgrpo),
        train_dataset=data,
    )
    assert ours.num_generations == 4

    def step(trainer):
        torch.manual_seed(0)  # the same sampling noise: the same completions
        output = trainer._generate_and_score_completions(inputs)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
        return output, trainer._compute_loss(trainer.model, output)

    (base, base_loss), (tree_out, tree_loss) = step(plain), step(ours)
    assert torch.equal(base["completion_ids"], tree_out["completion_ids"])
    mask = base["completion_mask"]
    assert base["advantages"].dim() == 1 and base["advantages"].abs().sum() > 0
    # R = GA + LA = (r - mean) + (r - mean): twice Dr. GRPO's advantage, on every token.
    torch.testing.assert_close(tree_out["advantages"], 2 * base["advantages"][:, None] * mask, rtol=0, atol=1e-6)
    torch.testing.assert_close(tree_loss, 2 * base_loss, rtol=1e-5, atol=1e-7)  # what the loss makes of it
    ours.args.use_local = False  # GA only: exactly Dr. GRPO
    ga_only, _ = step(ours)
    torch.testing.assert_close(ga_only["advantages"], base["advantages"][:, None] * mask, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Two processes whose forests differ in size (torchrun, two CPU processes)
# --------------------------------------------------------------------------------------------------


def test_two_processes_with_unequal_forests_stay_in_step(ttr, tmp_path):
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(here / "trl_two_processes.py"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert rank0["num_processes"] == 2
    # Process 0 forked in both rounds; process 1 had nothing to fork at, yet made the same three
    # sampling calls per step (chains, round 1, round 2), the last two with no prefixes of its own.
    assert len(rank0["calls"]) == len(rank1["calls"]) == 2 * 3
    assert all(n > 0 for n in rank0["calls"]) and rank1["calls"][1::3] == rank1["calls"][2::3] == [0, 0]
    assert rank1["leaves"] == [2] and rank1["padded_rows"] == [8, 8] and rank0["leaves"][0] > 2
    # DDP kept the weights equal, and the loss was finite.
    assert rank0["checksums"][0] == rank0["checksums"][1]
    assert all(abs(loss) < 1e3 for loss in rank0["losses"]) and len(rank0["losses"]) == 2


def test_sampling_through_trls_colocated_vllm(ttr, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -r requirements-cpu-vllm.txt)")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent)}
    done = subprocess.run(
        [sys.executable, str(here / "trl_vllm_colocate.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["leaves"] == 2 * 6 and result["forked"] >= 1  # two forests of (M, N, L, T) = (2, 1, 1, 2)
    # vLLM's log-probs, carried on the tree's segments into TRL's rows, match TRL's recomputation of
    # the same tokens: every token's sampler log-prob sits on its own token.
    assert result["has_nonzero_logprobs"] and result["logp_difference"] < 0.01
    assert abs(result["loss"]) < 1e3


# --------------------------------------------------------------------------------------------------
# Settings, reward functions
# --------------------------------------------------------------------------------------------------


def test_bad_settings_are_named(ttr, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="fork_score"):
        config(ttr, tmp_path, fork_score="loudest")
    with pytest.raises(ValueError, match="TreeRLConfig: --M must be >= 1"):
        config(ttr, tmp_path, M=0)
    # 4 rows per step cannot hold forests of 6 (TRL's own check says so on one process; with several,
    # TreeRLTrainer also requires whole forests on every process).
    with pytest.raises(ValueError, match="num_generations"):
        config(ttr, tmp_path, per_device_train_batch_size=2)
    with pytest.raises(NotImplementedError, match="tools"):
        ttr.TreeRLTrainer(
            tiny_model(tokenizer),
            reward_funcs=digit_share,
            args=config(ttr, tmp_path),
            train_dataset=dataset([PROMPT], [GOLD]),
            processing_class=tokenizer,
            tools=[len],
        )


def test_reward_functions_wrap_the_verifiers(ttr):
    completions = ["1+2=3\n3+3=6\nAnswer: 6", "Answer: 7", [{"role": "assistant", "content": "Answer: 6"}]]
    assert ttr.arith_reward_func(completions, answer=["6", "6", "6"], prompts=[PROMPT] * 3) == [1.0, 0.0, 1.0]
