"""Tests for treerl.py: the loss, collation (the flat layout of logprobs.py), the rollout step and one
update."""

import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import EOS, PAD  # the tiny_model fixture is there too

import hf_backend
import logprobs
import probes
import tree
import treerl
from hf_backend import HFBackend
from treerl import RolloutConfig, UpdateConfig, policy_loss

# --------------------------------------------------------------------------------------------------
# The policy loss
# --------------------------------------------------------------------------------------------------


def flat_terms(advantages: torch.Tensor, mask: torch.Tensor, aggregation: str = "token"):
    """What policy_loss reads from a flat batch, for the given per-token advantages and mask (the
    rule of logprobs.collate), and the denominator of the aggregation."""
    w = mask if aggregation == "token" else mask / mask.sum(-1, keepdim=True)
    terms = SimpleNamespace(advantages=(w * advantages)[..., None], pairs=mask[..., None], weight=w)
    return terms, float(mask.sum() if aggregation == "token" else len(mask))


def test_ratio_one_and_no_kl_gives_minus_mean_advantage():
    logp = torch.randn(3, 5)
    advantages = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float)
    loss, stats = policy_loss(logp, logp.clone(), *flat_terms(advantages, mask))
    assert loss.item() == pytest.approx(-(advantages * mask).sum().item() / mask.sum().item(), rel=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["ratio"] == pytest.approx(1.0)
    # Per-sequence averaging (GRPO): mean per response, then over responses.
    loss, _ = policy_loss(logp, logp.clone(), *flat_terms(advantages, mask, "sequence"))
    per_seq = (advantages * mask).sum(-1) / mask.sum(-1)
    assert loss.item() == pytest.approx(-per_seq.mean().item(), rel=1e-6)


def _grad(log_ratio: float, advantage: float, clip_low=0.2, clip_high=0.28) -> float:
    logp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, _ = policy_loss(
        logp, torch.zeros(1, 1), *flat_terms(torch.tensor([[advantage]]), torch.ones(1, 1)), clip_low, clip_high
    )
    loss.backward()
    return logp.grad.item()


def test_clipping_cuts_the_gradient_where_it_should():
    # A > 0: pushing the ratio up is rewarded until 1 + clip_high, then the gradient stops.
    assert _grad(math.log(1.1), +1.0) < 0  # loss falls as logp rises
    assert _grad(math.log(1.5), +1.0) == 0.0  # beyond 1.28: clipped
    assert _grad(math.log(0.5), +1.0) < 0  # below 1 - 0.2 with A > 0: not clipped (pessimistic bound)
    # A < 0: pushing the ratio down stops at 1 - clip_low; above 1 the gradient always flows.
    assert _grad(math.log(0.9), -1.0) > 0
    assert _grad(math.log(0.5), -1.0) == 0.0  # below 0.8: clipped
    assert _grad(math.log(1.5), -1.0) > 0  # above 1.28 with A < 0: not clipped
    # The asymmetric clip: 1.25 is inside [0.8, 1.28] but would be outside a symmetric 0.2 clip.
    assert _grad(math.log(1.25), +1.0) < 0
    assert _grad(math.log(1.25), +1.0, clip_high=0.2) == 0.0


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    zero_adv = torch.zeros(1, 2)
    loss, stats = policy_loss(logp, logp, *flat_terms(zero_adv, mask), ref_logp=logp.clone(), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.0) and stats["kl"] == pytest.approx(0.0)
    loss, stats = policy_loss(logp, logp, *flat_terms(zero_adv, mask), ref_logp=logp - 0.5, kl_coef=0.1)
    assert stats["kl"] > 0 and loss.item() == pytest.approx(0.1 * stats["kl"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Collation, the answer marker, and one rollout and update on a tiny model
# --------------------------------------------------------------------------------------------------


def test_collate_aligns_response_tokens_with_their_predictions():
    seq = tree.TrainSequence([7, 8, 9], [4, 5], [0.0, 0.0], [0.5, -1.0], 1.0, True, None)
    short = tree.TrainSequence([7], [4], [0.0], [2.0], 1.0, True, None)
    batch = logprobs.collate([seq, short], PAD)
    assert batch.input_ids.tolist() == [[7, 8, 9, 4, 5], [7, 4, PAD, PAD, PAD]]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert batch.advantages[..., 0].tolist() == [[0, 0, 0.5, -1.0], [2.0, 0, 0, 0]]
    assert batch.weight.tolist() == batch.mask.tolist()
    # Sequence aggregation: every token of a response weighs 1 / its length, advantages included.
    batch = logprobs.collate([seq, short], PAD, "sequence")
    assert batch.advantages[..., 0].tolist() == [[0, 0, 0.25, -0.5], [2.0, 0, 0, 0]]
    assert batch.weight.tolist() == [[0, 0, 0.5, 0.5], [1.0, 0, 0, 0]]


def test_answer_start_maps_text_markers_to_token_positions():
    decode = lambda ids: "".join(chr(ord("a") + i) if i < 26 else ":" for i in ids)  # noqa: E731
    find = treerl.answer_start_fn(decode, ["bc:"])
    assert find([0, 1, 2, 26, 3]) == 1  # "abc:d": the marker starts at token 1
    assert find([0, 0, 3]) is None


# --------------------------------------------------------------------------------------------------
# One rollout and one update on the tiny model
# --------------------------------------------------------------------------------------------------


def parity_score(texts, golds):
    """A stand-in verifier that a random model passes about half the time."""
    return [float(len(t) % 2 == 0) for t in texts]


@pytest.mark.parametrize("algo", ["treerl", "chainrl"])
def test_one_step_changes_the_weights_and_gives_finite_metrics(tiny_model, algo):
    import copy

    model = copy.deepcopy(tiny_model)
    backend = HFBackend(model, EOS, PAD)
    cfg = RolloutConfig(algo=algo, M=4, N=2, L=1, T=2, max_new_tokens=16, skip_last=2)
    torch.manual_seed(0)
    decode = lambda ids: "x" * len(ids)  # noqa: E731
    result = treerl.rollout(backend, [[5, 6, 7], [8, 9]], [None, None], parity_score, decode, cfg)
    assert result.sequences, "the stand-in verifier should give mixed rewards"
    leaves_per_prompt = 4 * (1 + 1 * 2 * 2) if algo == "treerl" else 4
    assert result.stats["leaves"] <= 2 * leaves_per_prompt
    assert all(math.isfinite(v) for v in result.stats.values())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = treerl.update(model, optimizer, None, result.sequences, UpdateConfig(micro_batch_size=5), PAD)
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_zero_signal_groups_are_skipped(tiny_model):
    backend = HFBackend(tiny_model, EOS, PAD)
    cfg = RolloutConfig(M=2, N=1, L=1, T=1, max_new_tokens=8, skip_last=1)
    result = treerl.rollout(backend, [[5, 6]], [None], lambda t, g: [0.0] * len(t), str, cfg)
    assert result.sequences == [] and result.stats["zero_signal_frac"] == 1.0
    result = treerl.rollout(
        backend,
        [[5, 6]],
        [None],
        lambda t, g: [0.0] * len(t),
        str,
        RolloutConfig(M=2, N=1, L=1, T=1, max_new_tokens=8, skip_last=1, keep_zero_signal=True),
    )
    assert len(result.sequences) == result.stats["leaves"] and all(
        a == 0.0 for s in result.sequences for a in s.advantages
    )


class EndlessBackend:
    """Every continuation runs to its budget without EOS: every leaf is truncated, reward 0."""

    def sample(self, prefixes, n, max_new_tokens, temperature=1.0, top_p=1.0):
        budgets = hf_backend.budgets_per_prefix(max_new_tokens, len(prefixes))
        return [[tree.Sample([7] * b, [-1.0] * b, [0.5] * b, finished=False) for _ in range(n)] for b in budgets]

    def sync(self, model):
        pass


def test_truncated_leaves_of_an_all_wrong_forest_still_get_the_penalty():
    """Regression: a forest whose leaves all scored 0 used to be skipped before the truncation
    penalty applied, so with --truncated_penalty -1 (the release) truncated responses went unpunished."""
    cfg = RolloutConfig(M=2, N=1, L=1, T=1, max_new_tokens=6, skip_last=1, truncated_penalty=-1.0)
    result = treerl.rollout(EndlessBackend(), [[5, 6]], [None], lambda t, g: [0.0] * len(t), str, cfg)
    assert result.stats["zero_signal_frac"] == 1.0 and len(result.sequences) == 4
    assert all(a == -1.0 for s in result.sequences for a in s.advantages)


def test_invalid_rollout_and_update_settings_are_named():
    with pytest.raises(ValueError, match="--fork_score"):
        RolloutConfig(fork_score="max").validate()
    with pytest.raises(ValueError, match="--M"):
        RolloutConfig(M=0).validate()
    with pytest.raises(ValueError, match="--aggregation"):
        UpdateConfig(aggregation="batch").validate()
    with pytest.raises(ValueError, match="--clip_low"):
        UpdateConfig(clip_low=1.5).validate()


def rates(optimizer, schedule, steps: int) -> list[float]:
    """The learning rate of each of the next `steps` optimizer steps."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_optimizer_settings_and_warm_up():
    model = torch.nn.Linear(2, 2)
    optimizer, schedule = treerl.optimizer_for(
        model, UpdateConfig(lr=1.0, adam_beta2=0.95, weight_decay=0.1, lr_warmup_ratio=0.05), steps=100
    )
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.1
    assert rates(optimizer, schedule, 7) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])  # 5 warm-up steps of 100
    optimizer, schedule = treerl.optimizer_for(model, UpdateConfig(lr=1.0, lr_warmup_steps=4), steps=100_000)
    assert rates(optimizer, schedule, 6) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    )  # 4 steps, whatever --steps is
    with pytest.raises(ValueError, match="--lr_warmup_steps"):
        UpdateConfig(lr_warmup_steps=4, lr_warmup_ratio=0.05).validate()
    optimizer, _ = treerl.optimizer_for(model, UpdateConfig(lr=1.0), steps=100)
    assert optimizer.param_groups[0]["lr"] == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------------
# Oracle blame (--blame): an experiment on the arithmetic task
# --------------------------------------------------------------------------------------------------

BLAME_PROMPT = "Compute 4+7-2+5.\n"  # 4+7=11, 11-2=9, 9+5=14


def blame_leaves():
    """Hand-built leaves with GRPO-like advantages, and the task's step truth over a char tokenizer."""
    import policy
    import tasks

    tokenizer = policy.build_char_tokenizer()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompt = encode(BLAME_PROMPT)

    def leaf(text, reward, advantage, finished=True):
        ids = encode(text) + ([tokenizer.eos_token_id] if finished else [])
        return tree.TrainSequence(prompt, ids, [0.0] * len(ids), [advantage] * len(ids), reward, finished, None)

    leaves = [
        leaf("4+7=11\n11-2=9\n9+5=14\nAnswer: 14", 1.0, 0.9),  # right
        leaf("4+7=11\n11-2=8\n8+5=13\nAnswer: 13", 0.0, -0.6),  # slips at line 1
        leaf("4+7=11\n11-2=", 0.0, -0.6, finished=False),  # cut off before anything went wrong
        leaf("4+7=12\n12-2=10\n10+5=15\nAnswer: 15", 0.0, -0.6),  # slips at line 0
    ]
    truth = lambda p, r, finished: tasks.arith_step_truth(decode(p), r, decode, finished)  # noqa: E731
    return leaves, truth


def test_oracle_blame_puts_a_wrong_leafs_mass_on_its_first_wrong_line_only():
    import random

    leaves, truth = blame_leaves()
    moved, count = probes.relocate_blame(leaves, truth, "oracle", random.Random(0))
    assert count == 2
    for before, after in zip(leaves, moved):
        assert sum(after.advantages) == pytest.approx(sum(before.advantages))  # the mass is kept
    # The right leaf and the cut-off one keep their advantages as they were.
    assert moved[0].advantages == leaves[0].advantages and moved[2].advantages == leaves[2].advantages
    for k, wrong_line in ((1, 1), (3, 0)):
        lines = truth(leaves[k].prompt_ids, leaves[k].response_ids, True).lines
        on = [a for a, line in zip(moved[k].advantages, lines) if line == wrong_line]
        off = [a for a, line in zip(moved[k].advantages, lines) if line != wrong_line]
        assert set(off) == {0.0} and len(set(on)) == 1
        assert on[0] == pytest.approx(-0.6 * len(lines) / len(on))


def test_placebo_blame_puts_the_same_mass_on_one_line_drawn_at_random():
    import random

    leaves, truth = blame_leaves()
    lines = truth(leaves[1].prompt_ids, leaves[1].response_ids, True).lines
    chosen = set()
    for seed in range(40):
        moved, count = probes.relocate_blame(leaves, truth, "placebo", random.Random(seed))
        assert count == 2 and moved[0].advantages == leaves[0].advantages
        assert sum(moved[1].advantages) == pytest.approx(sum(leaves[1].advantages))
        target = {line for a, line in zip(moved[1].advantages, lines) if a != 0.0}
        assert len(target) == 1
        chosen |= target
    assert chosen == set(lines)  # every line of the leaf can take the blame


def test_blame_needs_a_step_truth():
    cfg = RolloutConfig(algo="chainrl", blame="oracle")
    with pytest.raises(ValueError, match="--blame oracle needs a task"):
        treerl.rollout(None, [[1]], [0], None, None, cfg)


def test_first_line_length_ends_at_the_first_newline_after_some_text():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    tokens = lambda text: [ord(c) for c in text]  # noqa: E731
    assert probes.first_line_length(tokens("9\n9+5=14\n"), decode) == 2  # the rest of a slipped line
    assert probes.first_line_length(tokens("\n12-2=10\nAnswer: 15"), decode) == 9  # a fork on the newline
    assert probes.first_line_length(tokens("Answer: 15"), decode) == 10  # no newline: all of it
    # Tokens of several characters: a newline inside a token ends the line there, one that starts a
    # token after no text (a fork on the newline) does not.
    pieces = {1: "\n5", 2: "+1", 3: ".\nA", 4: "x"}
    assert probes.first_line_length([1, 2, 3, 4], lambda ids: "".join(pieces[i] for i in ids)) == 3


def fork_credit_forest():
    """One tree, forked once: a first segment "4+7=11\\n11-2=" (no fork above it), then the
    original continuation "8\\n8+5=13\\n" (wrong) and a branch "9\\n9+5=14\\n" (right)."""
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    root = tree.Node(encode("Compute 4+7-2+5.\n"))
    first = root.add(encode("4+7=11\n11-2="))
    wrong = first.add(encode("8\n8+5=13\n"), finished=True)
    right = first.add(encode("9\n9+5=14\n"), finished=True)
    wrong.reward, right.reward = 0.0, 1.0
    return root, first, wrong, right


@pytest.mark.parametrize("kind", ["fork_line", "fork_line_local"])
def test_fork_line_credit_moves_a_forked_segments_reward_onto_its_first_line(kind):
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    root, first, wrong, right = fork_credit_forest()
    cfg = RolloutConfig(fork_credit=kind)
    rewards = tree.process_rewards(root)
    credit = probes.on_fork_lines(root, rewards, cfg, decode)
    assert credit[first] == rewards[first]  # a tree's first segment starts at no fork: unchanged
    v = tree.values(root)
    for node in (wrong, right):
        n, head = len(node.tokens), 2  # "8\n" / "9\n": the rest of the line the fork re-sampled
        tokens = credit[node]
        assert len(tokens) == n and sum(tokens) == pytest.approx(rewards[node] * n)  # the mass is kept
        # GA + LA over sqrt(1 leaf); the local part is V(node) - V(first), the global V(node) - V(root).
        local = v[node] - v[first]
        moved = rewards[node] if kind == "fork_line" else local
        assert tokens[:head] == pytest.approx([rewards[node] - moved + moved * n / head] * head)
        assert tokens[head:] == pytest.approx([rewards[node] - moved] * (n - head))
    # Through the rollout's own path, the sequences carry the moved credit token by token.
    sequences = treerl.forest_sequences(root, cfg, random.Random(0), decode)
    wrong_seq = next(s for s in sequences if s.leaf is wrong)
    assert wrong_seq.advantages == [rewards[first]] * len(first.tokens) + credit[wrong]


def test_fork_line_credit_is_for_the_papers_tree_rewards_only():
    for bad in (dict(algo="chainrl"), dict(leave_one_out=True), dict(reweight="release")):
        with pytest.raises(ValueError, match="--fork_credit fork_line"):
            RolloutConfig(fork_credit="fork_line", **bad).validate()
