"""Tests for vllm_backend.VLLMBackend: parity with the transformers backend, weight sync after an
optimizer step, the save-and-restart fallback, and a full TreeRL step with --backend vllm.

The vLLM tests skip when vLLM is not installed; CI installs the CPU build (requirements-cpu-vllm.txt)
so that they run there. They use the tiny Llama model of policy.py (head size 32: the CPU build's
attention kernels have no head size 16, the size of test_train.py's smallest model).
"""

import json
import math
import os

import pytest
import torch

import logprobs
import policy
import train
import vllm_backend
from hf_backend import HFBackend

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine stays in this process

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed (pip install -r requirements-cpu-vllm.txt)"
)

# Tolerances seen on the CPU build (float32): log-probs and entropies within 1e-5 of transformers'.
TOL = 1e-4
PROMPTS = [
    "Compute 4+7-2.\n",
    "Compute 9-3+1-5.\n",
    "1+1=",
    # longer than one KV block (32 tokens), so the prefix cache holds it between calls
    "Compute 1+2+3+4+5+6+7+8+9. Show each step, then the answer.\n",
]


# --------------------------------------------------------------------------------------------------
# The entropy approximation (no vLLM needed)
# --------------------------------------------------------------------------------------------------


def test_topk_entropy_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    for scale in (0.5, 2.0, 8.0):
        logp = torch.log_softmax(torch.randn(50) * scale, -1)
        exact = logprobs.entropy(logp).item()
        assert vllm_backend.topk_entropy(logp.tolist()) == pytest.approx(exact, abs=1e-5)
        top = logp.topk(5).values.tolist()
        approx = vllm_backend.topk_entropy(top)
        truncated = -sum(math.exp(v) * v for v in top)
        assert truncated <= approx <= exact + 1e-6
    # Tokens cut by top-p come back as -inf and are ignored.
    assert vllm_backend.topk_entropy([math.log(0.5), math.log(0.5), -math.inf]) == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------------
# The vLLM backend against transformers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return policy.build_char_tokenizer()


def random_model(tokenizer, seed=0):
    """policy.build_tiny_model, small, with weights spread wider than the default init so that each
    next-token distribution has a clear favourite: greedy parity then cannot hinge on a near tie
    that float rounding decides differently in two engines."""
    cfg = policy.PolicyConfig(hidden_size=64, num_layers=2, num_heads=2)
    model = policy.build_tiny_model(cfg, tokenizer, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    return model


def prompt_ids(tokenizer):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def assert_same_samples(got, want, tol=TOL):
    """Same tokens and finished flags; log-probs and fork scores within tol. Returns max |diff|."""
    worst = 0.0
    for group_got, group_want in zip(got, want, strict=True):
        for a, b in zip(group_got, group_want, strict=True):
            assert a.tokens == b.tokens and a.finished == b.finished
            assert a.logprobs == pytest.approx(b.logprobs, abs=tol)
            assert a.entropies == pytest.approx(b.entropies, abs=tol)
            worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs + a.entropies, b.logprobs + b.entropies)])
    return worst


@needs_vllm
def test_greedy_parity_with_transformers_on_a_saved_model(tokenizer, tmp_path):
    model = random_model(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32)
    hf = HFBackend(reloaded, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # The engine reads the saved checkpoint; top-k = the whole vocabulary makes its entropy exact.
    backend = vllm_backend.VLLMBackend(
        reloaded, tokenizer.eos_token_id, path=str(tmp_path / "tiny"), entropy_top_k=len(tokenizer)
    )
    try:
        prompts = prompt_ids(tokenizer)
        got = backend.sample(prompts, 2, 40, temperature=0.0)
        want = hf.sample(prompts, 2, 40, temperature=0.0)
        worst = assert_same_samples(got, want)
        print(f"greedy parity: max |log-prob or entropy difference| = {worst:.2e}")
        assert any(s.finished for g in got for s in g) or all(len(s.tokens) == 40 for g in got for s in g)
    finally:
        backend.close()


@needs_vllm
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_log_probs_are_of_the_tempered_distribution(tokenizer, temperature):
    """What vLLM reports for sampled tokens equals log softmax(logits / T) of a fresh forward pass,
    the distribution HFBackend and the update use; with top-k = 20 of 99 tokens the fork score is
    topk_entropy of that distribution's 20 largest log-probs, below the exact entropy."""
    model = random_model(tokenizer, seed=1)
    backend = vllm_backend.VLLMBackend(model, tokenizer.eos_token_id, entropy_top_k=20)
    try:
        prompts = prompt_ids(tokenizer)
        torch.manual_seed(0)
        groups = backend.sample(prompts, 3, 24, temperature=temperature)
        torch.manual_seed(0)
        again = backend.sample(prompts, 3, 24, temperature=temperature)
        assert [[s.tokens for s in g] for g in groups] == [[s.tokens for s in g] for g in again]
        for prompt, group in zip(prompts, groups):
            for s in group:
                ids = torch.tensor([prompt + s.tokens])
                with torch.no_grad():
                    logits = model(ids).logits[0, len(prompt) - 1 : -1]
                logp, ent = logprobs.token_stats(logits, ids[0, len(prompt) :], temperature)
                assert s.logprobs == pytest.approx(logp.tolist(), abs=TOL)
                top20 = logprobs.tempered_log_softmax(logits, temperature).topk(20, dim=-1).values
                assert s.entropies == pytest.approx([vllm_backend.topk_entropy(row) for row in top20.tolist()], abs=TOL)
                assert all(a <= b + TOL for a, b in zip(s.entropies, ent.tolist()))
                assert s.finished == (s.tokens[-1] == tokenizer.eos_token_id)
    finally:
        backend.close()


@needs_vllm
def test_seeded_sampling_of_a_batch_larger_than_one_engine_step(tokenizer):
    """EPTree's fork rounds send many long prefixes at once: more prefill tokens than vLLM computes
    in one step. (With chunked prefill, the CPU build crashed here on seeded requests.)"""
    model = random_model(tokenizer, seed=4)
    backend = vllm_backend.VLLMBackend(model, tokenizer.eos_token_id)
    try:
        prefixes = [
            tokenizer(f"Compute {i}+{i % 7}-{i % 3}. " * 4, add_special_tokens=False)["input_ids"] for i in range(160)
        ]
        assert sum(map(len, prefixes)) > 8192
        torch.manual_seed(0)
        groups = backend.sample(prefixes, 2, 8, temperature=1.0)
        assert [len(g) for g in groups] == [2] * len(prefixes)
        assert all(1 <= len(s.tokens) <= 8 for g in groups for s in g)
        # A budget per prefix (EPTree's fork branches), sampled and greedy (n copies of a request).
        budgets = [1 + i % 5 for i in range(len(prefixes))]
        for temperature in (1.0, 0.0):
            groups = backend.sample(prefixes, 2, budgets, temperature=temperature)
            for budget, group in zip(budgets, groups):
                assert all(1 <= len(s.tokens) <= budget for s in group)
                assert all(s.finished or len(s.tokens) == budget for s in group)
    finally:
        backend.close()


def sft_step(model, tokenizer, lr=1e-2):
    """One AdamW step of supervised loss on one sequence: enough to move greedy outputs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.tensor([tokenizer("Compute 4+7-2.\n4+7=11\n11-2=9\nAnswer: 9", add_special_tokens=False)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@needs_vllm
def test_sync_after_an_optimizer_step_loads_the_new_weights_in_place(tokenizer):
    model = random_model(tokenizer, seed=2)
    hf = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    backend = vllm_backend.VLLMBackend(model, tokenizer.eos_token_id, entropy_top_k=len(tokenizer))
    try:
        prompts = prompt_ids(tokenizer)
        before = backend.sample(prompts, 1, 30, temperature=0.0)
        assert_same_samples(before, hf.sample(prompts, 1, 30, temperature=0.0))
        backend.sample(prompts, 1, 30, temperature=0.0)
        assert backend.stats["cached_prompt_tokens"] >= 32  # the long prompt's first block was re-used

        sft_step(model, tokenizer)
        cached = backend.stats["cached_prompt_tokens"]
        backend.sync(model)
        after = backend.sample(prompts, 1, 30, temperature=0.0)
        # The prefix cache was emptied: nothing computed with the old weights is served.
        assert backend.stats["cached_prompt_tokens"] == cached
        worst = assert_same_samples(after, hf.sample(prompts, 1, 30, temperature=0.0))
        print(f"after sync: max |log-prob or entropy difference| = {worst:.2e}")
        assert [s.tokens for g in after for s in g] != [s.tokens for g in before for s in g]
        changed = [
            abs(a - b)
            for ga, gb in zip(after, before)
            for sa, sb in zip(ga, gb)
            for a, b in zip(sa.logprobs, sb.logprobs)
        ]
        assert max(changed) > 1e-2
        assert backend.stats["fallback_syncs"] == 0, "the in-place path should have been used"
    finally:
        backend.close()


@needs_vllm
def test_sync_falls_back_to_save_and_restart_and_says_so(tokenizer, monkeypatch, caplog):
    model = random_model(tokenizer, seed=3)
    hf = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    backend = vllm_backend.VLLMBackend(model, tokenizer.eos_token_id, entropy_top_k=len(tokenizer))
    try:
        sft_step(model, tokenizer)

        def broken(_model):
            raise AttributeError("'Parameter' object has no attribute 'weight_loader'")

        monkeypatch.setattr(backend, "_load_in_place", broken)
        with caplog.at_level("WARNING", logger="treerl"):
            backend.sync(model)
        assert "falling back" in caplog.text and backend.stats["fallback_syncs"] == 1
        prompts = prompt_ids(tokenizer)
        assert_same_samples(backend.sample(prompts, 1, 20, temperature=0.0), hf.sample(prompts, 1, 20, temperature=0.0))
    finally:
        backend.close()


@needs_vllm
def test_a_full_treerl_step_with_the_vllm_backend(tmp_path, monkeypatch):
    import rewards

    # The warm-started tiny model is rarely right; a stand-in verifier with mixed verdicts makes
    # every step update the weights, so sync runs on changed weights.
    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))
    args = [
        "--hidden_size",
        "64",
        "--num_layers",
        "2",
        "--num_heads",
        "2",
        "--warmup_steps",
        "10",
        "--warmup_batch_size",
        "8",
        "--eval_size",
        "6",
        "--eval_samples",
        "2",
        "--prompts_per_step",
        "3",
        "--M",
        "2",
        "--N",
        "1",
        "--L",
        "1",
        "--T",
        "2",
        "--max_new_tokens",
        "40",
        "--steps",
        "2",
        "--backend",
        "vllm",
        "--output_dir",
        str(tmp_path),
        "--run_name",
        "vllm",
    ]
    summary = train.main(args)
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert "loss" in row, "every step should have updated the model"
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float)))
    assert summary["generated_tokens"] > 0 and summary["config"]["backend"] == "vllm"


def test_backend_vllm_without_vllm_fails_at_once_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit, match="requirements-cpu-vllm.txt"):
        train.main(["--backend", "vllm", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "default").exists(), "nothing should have run"


@needs_vllm
def test_the_benchmark_harness_on_vllm_answers_as_on_transformers(tokenizer, tmp_path):
    """`eval.evaluate --backend vllm`: the engine reads the model's folder and stops at its stop
    tokens; greedy responses, their lengths and grades equal the HF backend's."""
    from eval import evaluate

    random_model(tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = [{"problem": f"Compute {a}+{b}.", "answer": str(a + b)} for a, b in [(4, 7), (9, 3), (1, 1)]]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tmp_path / "tiny"), "--bench", "mine", "--bench_file", f"mine={tmp_path / 'mine.jsonl'}"]
    args += ["--temperature", "0", "--max_new_tokens", "24", "--device", "cpu", "--vllm_kv_cache_gb", "0.25"]
    summaries = {b: evaluate.main(args + ["--backend", b, "--out", str(tmp_path / b)]) for b in ("hf", "vllm")}
    responses = {
        b: [json.loads(line) for line in (tmp_path / b / "samples.jsonl").read_text().splitlines()] for b in summaries
    }
    keys = ("response", "num_tokens", "finished", "correct")
    assert [[r[k] for k in keys] for r in responses["vllm"]] == [[r[k] for k in keys] for r in responses["hf"]]
    assert any(r["response"] for r in responses["vllm"])
    assert summaries["vllm"]["benches"]["mine"]["sampling"]["backend"] == "vllm"
