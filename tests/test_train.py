"""Tests for train.py: configuration and data errors, a smoke run of the default path, resume."""

import json
from pathlib import Path

import pytest

import train
import treerl

# A very small version of the default run: seconds, not minutes.
TINY = (
    "--hidden_size 32 --num_layers 1 --num_heads 2 --warmup_steps 20 --warmup_batch_size 16 "
    "--eval_size 8 --eval_samples 2 --prompts_per_step 3 --M 2 --N 1 --L 1 --T 2 --max_new_tokens 40"
).split()


def tiny_args(tmp_path, *extra):
    return TINY + ["--output_dir", str(tmp_path)] + list(extra)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_defaults_parse_and_flags_override():
    config = train.parse_config([])
    assert config.rollout.algo == "treerl" and config.task.task == "arith"
    config = train.parse_config(["--algo", "chainrl", "--advantage", "rloo", "--lr", "1e-4"])
    assert config.rollout.algo == "chainrl" and config.rollout.advantage == "rloo"
    assert config.update.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--M", "0"], "--M must be >= 1"),
        (["--task", "math"], "--task math needs --data"),
        (["--arith_operands", "3"], "--arith_operands"),
        (["--hidden_size", "30", "--num_heads", "4"], "divisible"),
        (["--temperature", "0"], "--temperature"),
        (["--task", "math", "--data", "x.jsonl", "--blame", "oracle"], "--blame oracle needs an arithmetic task"),
    ],
)
def test_invalid_settings_fail_at_once_naming_the_field(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(argv)
    with pytest.raises(SystemExit, match=message):
        train.main(argv)


def test_a_choice_outside_its_set_is_refused_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--algo", "ppo"])
    assert "choose from 'treerl', 'chainrl'" in capsys.readouterr().err
    preset = tmp_path / "p.yaml"  # a preset's values are checked too
    preset.write_text("fork_score: loudest\n")
    with pytest.raises(ValueError, match="--fork_score must be one of nll, entropy, random"):
        train.parse_config(["--config", str(preset)])


def test_presets_load_and_unknown_keys_are_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("algo: chainrl\nM: 8\n")
    config = train.parse_config(["--config", str(preset), "--M", "6"])
    assert config.rollout.algo == "chainrl" and config.rollout.M == 6  # the flag wins
    preset.write_text("algo: chainrl\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        train.parse_config(["--config", str(preset)])


def test_shipped_presets_state_only_real_flags_that_differ_from_the_defaults():
    """A preset states what differs from the defaults: every key is a flag (load_preset checks it),
    and a value equal to the default is a mistake (the preset would hide a later change of it)."""
    from pathlib import Path

    import yaml

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert presets, "configs/ should ship presets"
    default = train.parse_config([]).as_dict()
    for preset in presets:
        settings = train.parse_config(["--config", str(preset)]).as_dict()
        keys = yaml.safe_load(preset.read_text()) or {}
        restated = [key for key in keys if settings[key] == default[key]]
        assert not restated, f"{preset.name} restates the default of {', '.join(restated)}"


def test_fixed_choices_are_checked_on_the_command_line_and_in_presets(tmp_path, capsys):
    """A Literal field becomes a flag with argparse choices (HfArgumentParser reads the annotation,
    postponed by `from __future__ import annotations`); a preset's value is checked against them too."""
    assert train.parse_config(["--backend", "vllm"]).run.backend == "vllm"
    with pytest.raises(SystemExit):
        train.parse_config(["--backend", "tgi"])
    assert "--backend {hf,vllm}" in capsys.readouterr().err
    preset = tmp_path / "p.yaml"
    preset.write_text("backend: tgi\n")
    with pytest.raises(ValueError, match="backend must be one of hf, vllm; got 'tgi'"):
        train.parse_config(["--config", str(preset)])


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def test_default_path_smoke_run(tmp_path):
    summary = train.main(tiny_args(tmp_path, "--steps", "2", "--run_name", "smoke"))
    run_dir = tmp_path / "smoke"
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "generated_tokens", "wall_seconds", "config"):
        assert key in saved
    assert saved["generated_tokens"] > 0 and saved == json.loads(json.dumps(summary))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (run_dir / "metrics.png").stat().st_size > 0
    assert (run_dir / "warmstart" / "config.json").exists()
    assert (run_dir / "checkpoints" / "step-000002" / "trainer_state.pt").exists()
    # --save_trees (on by default): a page of the first held-out problem's forest per evaluation.
    assert sorted(p.name for p in (run_dir / "trees").iterdir()) == ["step_0000.html", "step_0002.html"]


def test_the_default_update_runs_treerl_policy_loss(tmp_path, monkeypatch):
    """What you read is what runs: the default configuration (tree packing on) trains through
    treerl.policy_loss, so replacing it changes the update. Here the replacement scales the loss
    by zero, and every update's gradient vanishes."""
    import packing
    import rewards
    import treerl

    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))
    calls = []

    def zeroed(logp, old_logp, batch, *args, **kwargs):
        calls.append(type(batch))
        loss, stats = real(logp, old_logp, batch, *args, **kwargs)
        return 0.0 * loss, stats

    real = treerl.policy_loss
    monkeypatch.setattr(treerl, "policy_loss", zeroed)
    assert "--pack_tree" not in TINY and treerl.UpdateConfig().pack_tree  # the default layout: packed
    train.main(tiny_args(tmp_path, "--steps", "2", "--run_name", "replaced"))
    rows = [json.loads(line) for line in (tmp_path / "replaced" / "metrics.jsonl").read_text().splitlines()]
    assert calls and set(calls) == {packing.PackedBatch}
    updates = [r for r in rows[1:] if "grad_norm" in r]
    assert updates and all(r["grad_norm"] == 0.0 and 0 < r["packed_token_ratio"] < 1 for r in updates)


def test_peak_memory_of_each_phase_is_recorded(tmp_path, monkeypatch):
    """summary.json holds each phase's largest peak resident memory over the run, and every row of
    metrics.jsonl the peaks of its own step's phases (where /proc is, on Linux)."""
    import os

    import rewards

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("peak memory per phase is read from /proc (Linux)")
    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))
    summary = train.main(tiny_args(tmp_path, "--steps", "2", "--eval_every", "0", "--run_name", "memory"))
    peaks = summary["peak_rss_gib_by_phase"]
    assert set(peaks) == {"warm_start", "rollout", "update", "evaluation"}
    assert all(0.05 < gib < 64 for gib in peaks.values())
    rows = [json.loads(line) for line in (tmp_path / "memory" / "metrics.jsonl").read_text().splitlines()]
    assert "peak_rss_gib_rollout" in rows[1] and "peak_rss_gib_evaluation" not in rows[1]
    assert {"peak_rss_gib_rollout", "peak_rss_gib_update", "peak_rss_gib_evaluation"} <= set(rows[2])
    for phase, gib in peaks.items():  # the run's peak of a phase is the largest of its steps'
        assert gib >= max(r.get(f"peak_rss_gib_{phase}", 0) for r in rows)


def test_cached_warm_start_is_reused_only_with_the_same_settings(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "cache"))
    capsys.readouterr()
    train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "cache"))  # the same command again
    out = capsys.readouterr().out
    assert "starting over" in out and "warm start: reusing" in out
    (tmp_path / "cache" / "trees" / "stale.html").write_text("from the run before")
    train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "cache", "--warmup_slip_rate", "0", "--overwrite"))
    assert "reusing" not in capsys.readouterr().out  # another warm start: made anew
    recipe = json.loads((tmp_path / "cache" / "warmstart" / "recipe.json").read_text())
    assert recipe["warmup_slip_rate"] == 0 and not (tmp_path / "cache" / "trees" / "stale.html").exists()


def test_token_budget_stops_training_early(tmp_path):
    summary = train.main(
        tiny_args(
            tmp_path,
            "--steps",
            "50",
            "--max_generated_tokens",
            "200",
            "--eval_every",
            "0",
            "--save_every",
            "0",
            "--run_name",
            "budget",
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    totals = [r["generated_tokens_total"] for r in rows[1:]]
    assert totals[-1] >= 200 and all(t < 200 for t in totals[:-1])
    assert len(rows) - 1 < 50 and "eval_sampled" in rows[-1]
    assert summary["generated_tokens"] == totals[-1]


def _comparable(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "peak_rss_"))} for r in rows]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import rewards

    # An untrained tiny model is never right; a stand-in verifier with mixed verdicts makes every
    # step update the weights, so the comparison below covers optimizer and RNG state.
    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))
    common = ["--steps", "4", "--save_every", "2", "--eval_every", "2"]
    train.main(tiny_args(tmp_path, *common, "--run_name", "straight"))

    real_rollout = treerl.rollout

    def crash_at_step_3(*args, **kwargs):
        if kwargs["seed"] == 3:  # the trainer seeds each step's rollout with the step (seed 0)
            raise KeyboardInterrupt("simulated kill")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(treerl, "rollout", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(tmp_path, *common, "--run_name", "killed"))
    monkeypatch.setattr(treerl, "rollout", real_rollout)
    train.main(tiny_args(tmp_path, *common, "--run_name", "killed", "--resume"))

    straight = _comparable(tmp_path / "straight" / "metrics.jsonl")
    resumed = _comparable(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert all("loss" in r for r in straight[1:]), "every step should have updated the model"
    # Equal up to float rounding: a resumed process may sum a statistic in another order (seen: the
    # mean entropy differing in the 9th digit), while every sample, reward and loss is the same.
    assert resumed == [pytest.approx(row, rel=1e-6) for row in straight]
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["accuracy_after"] == b["accuracy_after"] and a["generated_tokens"] == b["generated_tokens"]


# --------------------------------------------------------------------------------------------------
# Run folders never mix
# --------------------------------------------------------------------------------------------------


def test_a_run_of_other_settings_stops_at_a_folder_that_holds_another_run(tmp_path):
    """The README's two commands in a row, `python train.py` then another model into the same folder:
    the second stops before any work (exit status 1, a message) and the first run stays as it was."""
    train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "shared"))
    summary = (tmp_path / "shared" / "summary.json").read_bytes()
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as stopped:
            train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "shared", "--model", "smollm2-135m", *extra))
        message = str(stopped.value.code)  # a message: Python exits with status 1
        assert "holds a run of other settings" in message and 'model: "" in the folder, "smollm2-135m" here' in message
        assert "--overwrite" in message and "--run_name" in message
    assert (tmp_path / "shared" / "summary.json").read_bytes() == summary
    with pytest.raises(SystemExit, match="give one of them"):
        train.main(tiny_args(tmp_path, "--run_name", "shared", "--resume", "--overwrite"))


def test_a_folder_with_files_but_no_run_is_left_alone(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files but no run"):
        train.main(tiny_args(tmp_path, "--steps", "0", "--run_name", "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Keep the checkpoint just written and the one before it; later steps (another run's) go."""
    from types import SimpleNamespace

    class Saved:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)

        def state_dict(self):
            return {}

    run = SimpleNamespace(dir=tmp_path, model=Saved(), tokenizer=Saved())
    state = SimpleNamespace(optimizer=Saved(), scheduler=Saved(), before={}, generated=0, elapsed=0.0, resumed_at=0.0)
    for step in (100, 120):  # left by a run of a longer schedule
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    for step, kept in [
        (20, ["step-000020"]),
        (40, ["step-000020", "step-000040"]),
        (60, ["step-000040", "step-000060"]),
    ]:
        state.step = step
        train.save_checkpoint(run, state)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == kept


def test_task_code_without_a_sandbox_stops_before_any_work(tmp_path, no_bwrap):
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"problem": "Add.", "tests": [{"input": "1 2\n", "output": "3\n"}]}) + "\n")
    argv = tiny_args(tmp_path, "--task", "code", "--data", str(data), "--warmup_steps", "0", "--run_name", "code")
    with pytest.raises(SystemExit, match="--task code: no usable bubblewrap.*apt-get install bubblewrap"):
        train.main(argv)
    assert not (tmp_path / "code").exists()


def test_kl_to_the_starting_policy_is_logged(tmp_path, monkeypatch):
    import math

    import rewards

    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))
    train.main(tiny_args(tmp_path, "--steps", "2", "--kl_coef", "0.1", "--lr", "1e-2", "--run_name", "kl"))
    rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    # Step 1 starts at the reference (KL 0); after one update the policy has moved away from it.
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["kl"] > 0 and math.isfinite(rows[2]["kl"])
