"""configs/release.yaml reproduces what the authors' released code computes, checked on a forest
built by hand against numbers worked out here from the release's recipe.

The recipe, restated (facts about the release, from its TreeRL training code):
 1. leaf reward r in {0, 1}: 1 only if the response ended (EOS) and is right;
 2. leave-one-out centring over all n leaves: r' = r - (S - r) / (n - 1), S = correct leaves;
 3. V'(s) = mean of r' over all leaves under s (so V'(root) = 0);
 4. K = 16 leaves are kept for training (at least one correct); values still use all n;
 5. W(s) = V'(s) / sqrt(sel(s)), sel(s) = kept leaves under s;
 6. LA(s) = W(s) - W(parent); if |LA(s)| < 1e-8 it takes the LA of the segment above (not
    directly under the prompt); R(s) = LA(s) + W(s), so 2 W(s) directly under the prompt;
 7. every token of s gets R(s);
 8. a kept response that never ended gets -1 on every token.
"""

import math
import random

import pytest

import train
import treerl
from tree import Node

EOS = 0


def release_config(**changes) -> treerl.RolloutConfig:
    cfg = train.parse_config(["--config", "configs/release.yaml"]).rollout
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def forest():
    """Prompt [1, 2]; a = [3, 4] with leaves a1 (right), a2 (wrong), a3 (truncated: no EOS);
    b (right); c (wrong). n = 5, S = 2."""
    root = Node([1, 2])
    a = root.add([3, 4])
    a1 = a.add([5, EOS], finished=True)
    a2 = a.add([6, EOS], finished=True)
    a3 = a.add([7])
    b = root.add([8, 9, EOS], finished=True)
    c = root.add([10, EOS], finished=True)
    for leaf, r in ((a1, 1.0), (a2, 0.0), (a3, 0.0), (b, 1.0), (c, 0.0)):
        leaf.reward = r
    return root, dict(a=a, a1=a1, a2=a2, a3=a3, b=b, c=c)


def test_the_preset_is_the_release():
    cfg = release_config()
    assert (cfg.M, cfg.N, cfg.L, cfg.T, cfg.keep_leaves) == (6, 2, 1, 2, 16)
    assert (cfg.temperature, cfg.top_p, cfg.fork_score) == (1.2, 0.95, "nll")
    update = train.parse_config(["--config", "configs/release.yaml"]).update
    assert (update.clip_low, update.clip_high, update.aggregation) == (0.2, 0.26, "sequence")
    assert (update.train_temperature, update.adam_beta2, update.weight_decay, update.lr_warmup_ratio) == (
        1.0,
        0.95,
        0.1,
        0.05,
    )


def test_release_advantages_of_a_hand_built_forest():
    root, n = forest()
    sequences = treerl.forest_sequences(root, release_config(), random.Random(0))
    by_leaf = {s.leaf: s for s in sequences}
    assert set(by_leaf) == {n[k] for k in ("a1", "a2", "a3", "b", "c")}  # 5 <= 16: all kept

    # Step 2: r' = r - (2 - r) / 4.
    right, wrong = 1 - 1 / 4, 0 - 2 / 4
    # Step 3, 5: values over all leaves, each divided by sqrt of its kept leaves.
    W_a = ((right + wrong + wrong) / 3) / math.sqrt(3)
    W = {"a1": right, "a2": wrong, "b": right, "c": wrong}
    # Step 6: R = LA + W; directly under the prompt R = 2 W.
    R_a = 2 * W_a
    expected = {
        "a1": [R_a] * 2 + [(W["a1"] - W_a) + W["a1"]] * 2,
        "a2": [R_a] * 2 + [(W["a2"] - W_a) + W["a2"]] * 2,
        "a3": [-1.0] * 3,  # step 8: no EOS
        "b": [2 * W["b"]] * 3,
        "c": [2 * W["c"]] * 2,
    }
    for name, advantages in expected.items():
        assert by_leaf[n[name]].advantages == pytest.approx(advantages), name
    assert R_a == pytest.approx(-0.0962250, abs=1e-6)  # the numbers, once, by hand


def test_release_sqrt_counts_only_the_kept_leaves():
    root, n = forest()
    sequences = treerl.forest_sequences(root, release_config(keep_leaves=3), random.Random(1))
    kept = {s.leaf for s in sequences}
    assert len(kept) == 3 and any(leaf.reward == 1.0 for leaf in kept)
    right, wrong = 3 / 4, -1 / 2
    under_a = [n[k] for k in ("a1", "a2", "a3")]
    sel_a = sum(leaf in kept for leaf in under_a)
    W_a = ((right + wrong + wrong) / 3) / math.sqrt(sel_a) if sel_a else 0.0
    for s in sequences:
        if not s.finished:
            assert s.advantages == [-1.0] * len(s.advantages)
        elif s.leaf in under_a:
            W_leaf = right if s.leaf.reward else wrong
            assert s.advantages == pytest.approx([2 * W_a] * 2 + [(W_leaf - W_a) + W_leaf] * 2)
        else:
            assert s.advantages == pytest.approx([2 * (right if s.leaf.reward else wrong)] * len(s.advantages))


def test_release_chainrl_is_clamped_rloo_with_minus_one_for_truncation():
    root = Node([1, 2])
    leaves = [root.add([t, EOS], finished=True) for t in (3, 4, 5)] + [root.add([6])]
    for leaf, r in zip(leaves, (1.0, 1.0, 1.0, 0.0)):
        leaf.reward = r
    cfg = release_config(algo="chainrl", L=0, M=4, advantage="rloo", clamp_advantages=True)
    sequences = treerl.forest_sequences(root, cfg, random.Random(0))
    # RLOO: right 1 - 2/3 = 1/3; the truncated one is -1 anyway (step 8).
    assert [s.advantages[0] for s in sequences] == pytest.approx([1 / 3, 1 / 3, 1 / 3, -1.0])
