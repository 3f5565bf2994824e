"""Tests for policy.py: the tiny model and tokenizer, and the cached warm start."""

import pytest

from policy import PolicyConfig, build_char_tokenizer, build_tiny_model, warm_started_policy
from tasks import TaskConfig

TINY = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, warmup_steps=5, warmup_batch_size=4, device="cpu")


def test_tiny_model_and_tokenizer_reload_like_a_hub_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = build_char_tokenizer()
    text = "Compute 4+7-2.\n4+7=11\n11-2=9\nAnswer: 9"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    model = build_tiny_model(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # Saved side by side, the Auto classes must give back the same tokenizer and the same model.
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text and again.eos_token_id == tokenizer.eos_token_id
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-6)


def test_warm_start_is_cached_by_its_settings(tmp_path, capsys):
    import torch

    task_cfg = TaskConfig(eval_size=8)
    model, _, task = warm_started_policy(TINY, task_cfg, 0, tmp_path, torch.device("cpu"), train_size=64)
    assert (tmp_path / "recipe.json").exists() and len(task.train) == 64
    capsys.readouterr()
    again, _, _ = warm_started_policy(TINY, task_cfg, 0, tmp_path, torch.device("cpu"), train_size=64)
    assert "reusing" in capsys.readouterr().out
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    warm_started_policy(TINY, task_cfg, 1, tmp_path, torch.device("cpu"), train_size=64)  # another seed
    assert "settings differ" in capsys.readouterr().out


def test_invalid_policy_settings_are_named():
    with pytest.raises(ValueError, match="divisible"):
        PolicyConfig(hidden_size=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="--dtype"):
        PolicyConfig(dtype="float16").validate()


def test_warm_start_in_micro_batches_takes_the_same_steps(tmp_path):
    """Gradient accumulation over micro-batches (here 3 + 1 examples) gives the whole batch's
    steps, up to float rounding."""
    import dataclasses

    import torch

    task_cfg, cpu = TaskConfig(eval_size=8), torch.device("cpu")
    whole, _, _ = warm_started_policy(TINY, task_cfg, 0, tmp_path / "whole", cpu, train_size=64)
    micro_cfg = dataclasses.replace(TINY, warmup_micro_batch_size=3)
    micro, _, _ = warm_started_policy(micro_cfg, task_cfg, 0, tmp_path / "micro", cpu, train_size=64)
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(p.grad is None for p in micro.parameters())  # the last step's gradient is freed


def test_rss_peaks_record_each_phase_and_keep_the_largest():
    import time

    import torch

    from policy import RssPeaks

    peaks = RssPeaks()
    if not peaks.available:
        pytest.skip("peak memory per phase is read from /proc (Linux)")
    with peaks.phase("big"):
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: well above what other threads move
        time.sleep(0.2)  # held long enough to be seen where the high-water mark is above it
        del block
    with peaks.phase("small"):
        pass
    assert peaks.last["big"] >= peaks.last["small"] + 0.2, peaks.last
    with peaks.phase("big"):
        pass
    assert peaks.by_phase["big"] > peaks.last["big"]  # the largest over the run is kept


FRAGMENT = """
import contextlib, sys, torch
import policy
mode = sys.argv[1]
phase = contextlib.nullcontext()
if mode == "fixed":
    assert policy.set_mmap_threshold(policy.LEAN_THRESHOLD)
elif mode.startswith("phase "):  # a phase of a --lean_heap run
    phase = policy.RssPeaks(lean_heap=True).phase(mode.split()[1])
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
with phase:
    # One large block freed first: glibc then counts blocks up to its size as small (heap) ones.
    big = torch.ones(16 * 2**20 // 4)
    del big
    blocks, pins = [], []
    for _ in range(24):
        blocks.append(torch.ones(2 * 2**20 // 4))  # 2 MiB, touched
        pins.append(torch.ones(64))  # a small live block after each
    before = resident()
    del blocks[:-1]
    print((before - resident()) / 2**20)
"""


@pytest.mark.parametrize(
    "mode, given_back",
    [("fixed", True), ("glibc default", False), ("phase update", True), ("phase rollout", False)],
    ids=["fixed", "glibc default", "lean run, update", "lean run, rollout"],
)
def test_freed_large_blocks_leave_the_resident_memory(mode, given_back):
    """With a 512 KiB mmap threshold (set_mmap_threshold, and the lean phases of a --lean_heap run),
    23 freed blocks of 2 MiB, each followed by a live small one, leave the resident size at once;
    with glibc's default (after one larger block was freed), and in a lean run's rollout (a 32 MiB
    threshold), they stay resident, which is what the setting is for."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc and /proc")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, cwd=root, check=True)
    released = float(out.stdout.split()[-1])
    if given_back:
        assert released >= 40, released
    else:
        assert released < 10, released
