"""The experiment scripts in eval/ run end to end on a tiny model (their --quick settings)."""

import json

import pytest
import torch

import rewards
from eval import compare_rl, search_efficiency

TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--warmup_steps", "20",
        "--warmup_batch_size", "16", "--eval_size", "8", "--eval_samples", "2", "--max_new_tokens", "40"]


@pytest.fixture
def coin_verifier(monkeypatch):
    """An untrained tiny model is never right; a stand-in verdict gives mixed rewards."""
    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))


def test_search_efficiency_quick(tmp_path, coin_verifier):
    result = search_efficiency.main(["--quick", "--prompts", "6", "--out", str(tmp_path / "out"),
                                     "--runs_dir", str(tmp_path / "runs"), *TINY])
    saved = json.loads((tmp_path / "out" / "search_efficiency.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "out" / "search_efficiency.png").stat().st_size > 0
    rows = {(r["method"], r["M"]): r for r in saved["rows"]}
    assert set(m for m, _ in rows) == {"chains", "eptree-entropy", "eptree-nll", "eptree-random"}
    for (method, m), row in rows.items():
        assert row["leaves"] == (m if method == "chains" else m * (1 + 2 * 2))
        assert 0 <= row["pass_rate"] <= row["pass_at_budget"] <= 1
        assert row["budget_tokens"] > 0
    assert rows[("chains", 8)]["budget_tokens"] > rows[("chains", 4)]["budget_tokens"]
    assert any(0 < r["pass_rate"] < 1 for r in saved["rows"])


def test_compare_rl_quick(tmp_path, coin_verifier):
    result = compare_rl.main(["--quick", "--budget", "3000", "--eval_every", "1", "--out", str(tmp_path / "out"),
                              "--runs_dir", str(tmp_path / "runs"), "--prompts_per_step", "3", *TINY])
    saved = json.loads((tmp_path / "out" / "compare_rl.json").read_text())
    assert (tmp_path / "out" / "compare_rl.png").stat().st_size > 0
    assert {r["method"] for r in saved["rows"]} == {"treerl", "chainrl-grpo"}
    for method in ("treerl", "chainrl-grpo"):
        points = [r for r in saved["rows"] if r["method"] == method]
        assert points[0]["generated_tokens"] == 0 and points[0]["step"] == 0
        tokens = [p["generated_tokens"] for p in points]
        assert tokens == sorted(tokens) and tokens[-1] >= result["budget_tokens"] == 300
        assert all(t < 300 for t in tokens[:-1])  # stops at the first step past the budget
        assert all(0 <= p["accuracy"] <= 1 for p in points)
    # Both start from the same warm start and are evaluated on the same held-out problems.
    starts = {r["accuracy"] for r in saved["rows"] if r["step"] == 0}
    assert len(starts) == 1


def test_compare_rl_rejects_unknown_method():
    with pytest.raises(SystemExit):
        compare_rl.parse_args(["--methods", "treerl,ppo"])


def test_throughput_writes_every_ratio(tmp_path):
    from eval import throughput
    result = throughput.main(["--models", "default", "--repeats", "1", "--prompts", "2", "--batch", "32",
                              "--update_prompts", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["gen_vs_limit"] == result["gen_vs_limit"] > 0
    default = saved["models"]["default"]
    (pair,) = default["tree_vs_chain"]
    assert pair["prompts"] == 2 and pair["forest_tokens"] == pair["forest_no_reuse_tokens"] > 0
    assert saved["tree_vs_chain"] == pair["tree_vs_chain"] > 0
    assert [u["L"] for u in default["update"]] == [1, 2]
    assert all(0 < u["unique_over_flat"] < 1 and u["packed_speedup"] > 0 for u in default["update"])


def test_benchmark_scripts_refuse_what_they_cannot_run(tmp_path):
    from eval import gpu_memory, throughput
    with pytest.raises(SystemExit):
        throughput.main(["--models", "7b", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            throughput.main(["--device", "cuda", "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            gpu_memory.main(["--out", str(tmp_path)])
