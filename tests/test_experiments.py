"""The experiment scripts in eval/ run end to end on a tiny model (their --quick settings), and the
measurements of eval/bench.py at tiny sizes."""

import json
from pathlib import Path

import pytest
import torch

import policy
import probes
import rewards
import tasks
import tree
import treerl
from eval import bench, compare_rl, credit, search_efficiency
from eval.common import cpu_model, machine, warm_started_policy
from policy import build_char_tokenizer

TINY = (
    "--hidden_size 32 --num_layers 1 --num_heads 2 --warmup_steps 20 --warmup_batch_size 16 "
    "--eval_size 8 --eval_samples 2 --max_new_tokens 40"
).split()


@pytest.fixture
def coin_verifier(monkeypatch):
    """An untrained tiny model is never right; a stand-in verdict gives mixed rewards."""
    monkeypatch.setattr(rewards, "arith_reward", lambda response, gold: float(len(response) % 2 == 0))


def test_search_efficiency_quick(tmp_path, coin_verifier, monkeypatch):
    argv = [
        "--quick",
        "--prompts",
        "6",
        "--out",
        str(tmp_path / "out"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--chain_lengths",
        "2,3:3,3",
        *TINY,
    ]
    result = search_efficiency.main(argv)
    saved = json.loads((tmp_path / "out" / "search_efficiency.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for png in ("search_efficiency.png", "search_efficiency_chain_length.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    rows = {(r["method"], r["M"]): r for r in saved["rows"]}
    assert set(m for m, _ in rows) == {"chains", "eptree-entropy", "eptree-nll", "eptree-random"}
    for (method, m), row in rows.items():
        assert row["leaves"] == (m if method == "chains" else m * (1 + 2 * 2))
        assert 0 <= row["correct_fraction"] <= row["pass_rate"] <= 1
        assert row["budget_tokens"] > 0
    assert rows[("chains", 3)]["budget_tokens"] > rows[("chains", 2)]["budget_tokens"]
    assert any(0 < r["correct_fraction"] < 1 for r in saved["rows"])
    # One short task per chain length, each with its own warm start, chains against eptree-nll only.
    lengths = saved["chain_length"]["rows"]
    assert list(lengths) == ["2,3", "3,3"]
    assert {r["method"] for r in lengths["3,3"]} == {"chains", "eptree-nll"}
    assert (tmp_path / "runs" / "operands-3-3" / "warm-start" / "warmstart" / "recipe.json").exists()

    # Every point was saved as it was measured: a second run measures nothing and reports the same.
    monkeypatch.setattr(search_efficiency, "search", lambda *a, **k: pytest.fail("measured again"))
    again = search_efficiency.main(argv)
    assert again["rows"] == result["rows"] and again["chain_length"] == result["chain_length"]


def test_chains_at_interpolates_in_log_tokens():
    chains = [{"tokens": 100.0, "pass_rate": 0.4}, {"tokens": 400.0, "pass_rate": 0.8}]
    assert search_efficiency.chains_at(200.0, chains) == pytest.approx(0.6)  # halfway in log-tokens
    assert search_efficiency.chains_at(100.0, chains) == pytest.approx(0.4)
    assert search_efficiency.chains_at(99.0, chains) is None and search_efficiency.chains_at(401.0, chains) is None


def test_compare_rl_plots_curves_or_finals(tmp_path, monkeypatch):
    """Runs evaluated along training are drawn as curves; runs evaluated only before and after
    (--eval_every 0), where a curve would be a straight line, as each seed's final accuracy."""

    def run(method, seed, steps):
        return [
            {"method": method, "seed": seed, "lr": 1e-5, "step": step, "generated_tokens": 100 * step,
             "accuracy": 0.3 + 0.01 * step + 0.01 * seed, "greedy_accuracy": 0.5 + 0.005 * step}
            for step in steps
        ]  # fmt: skip

    drawn = []
    for name in ("draw_curves", "draw_finals"):
        real = getattr(compare_rl, name)
        monkeypatch.setattr(compare_rl, name, lambda *args, real=real, name=name: drawn.append(name) or real(*args))
    methods = ["treerl", "chainrl-grpo"]
    along = [row for m in methods for seed in (0, 1) for row in run(m, seed, [0, 5, 10])]
    ends = [row for m in methods for seed in (0, 1) for row in run(m, seed, [0, 10 + seed])]
    compare_rl.plot(along, methods, 1000, tmp_path / "along.png")
    compare_rl.plot(ends, methods, 1000, tmp_path / "ends.png")
    assert drawn == ["draw_curves"] * 2 + ["draw_finals"] * 2  # one per panel: avg@k, greedy
    assert (tmp_path / "along.png").stat().st_size > 0 and (tmp_path / "ends.png").stat().st_size > 0


def test_compare_rl_quick(tmp_path, coin_verifier):
    result = compare_rl.main(
        [
            "--quick",
            "--budget",
            "3000",
            "--eval_every",
            "1",
            "--save_every",
            "2",
            "--drop_checkpoints",
            "--out",
            str(tmp_path / "out"),
            "--runs_dir",
            str(tmp_path / "runs"),
            "--prompts_per_step",
            "3",
            *TINY,
        ]
    )
    saved = json.loads((tmp_path / "out" / "compare_rl.json").read_text())
    # Checkpoints come every --save_every steps, and a finished run's are deleted on request.
    for method in ("treerl", "chainrl-grpo"):
        made_with = json.loads((tmp_path / "runs" / f"{method}-seed0" / "compare_rl_argv.json").read_text())
        assert made_with[made_with.index("--save_every") + 1] == "2"
        assert not (tmp_path / "runs" / f"{method}-seed0" / "checkpoints").exists()
    assert (tmp_path / "out" / "compare_rl.png").stat().st_size > 0
    assert {r["method"] for r in saved["rows"]} == {"treerl", "chainrl-grpo"}
    for method in ("treerl", "chainrl-grpo"):
        points = [r for r in saved["rows"] if r["method"] == method]
        assert points[0]["generated_tokens"] == 0 and points[0]["step"] == 0
        tokens = [p["generated_tokens"] for p in points]
        assert tokens == sorted(tokens) and tokens[-1] >= result["budget_tokens"] == 300
        assert all(t < 300 for t in tokens[:-1])  # stops at the first step past the budget
        assert all(0 <= p["accuracy"] <= 1 for p in points)
        # Responses trained on, counted up to each evaluation from the run's own step metrics.
        log = (tmp_path / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()
        steps = [m for m in map(json.loads, log) if "time_rollout" in m]
        assert points[-1]["trained_sequences"] == sum(m["sequences"] for m in steps) > 0
    # Both start from the same warm start and are evaluated on the same held-out problems.
    starts = {(r["accuracy"], r["greedy_accuracy"]) for r in saved["rows"] if r["step"] == 0}
    assert len(starts) == 1
    [difference] = saved["differences"]
    assert difference["comparison"] == "treerl - chainrl-grpo"
    assert difference["accuracy_low"] <= difference["accuracy"] <= difference["accuracy_high"]
    assert {t["method"]: t["lr"] for t in saved["summary"]} == {"treerl": 3e-5, "chainrl-grpo": 3e-5}
    # The cost is the runs' own wall time (train.py's, summed over resumes), each run counted once.
    run_walls = [
        json.loads((tmp_path / "runs" / f"{m}-seed0" / "summary.json").read_text())["wall_seconds"]
        for m in ("treerl", "chainrl-grpo")
    ]
    assert saved["run_seconds"] == {"comparison": pytest.approx(sum(run_walls)), "lr_sweep": 0}


def test_compare_rl_sweeps_rates_in_parallel_and_reuses_recorded_runs(tmp_path, coin_verifier, monkeypatch):
    argv = [
        "--methods",
        "treerl,chainrl-grpo",
        "--seeds",
        "0",
        "--budget",
        "3000",
        "--eval_every",
        "1",
        "--lr_sweep",
        "1e-5,1e-3",
        "--sweep_seeds",
        "100",
        "--jobs",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--prompts_per_step",
        "3",
        *TINY,
    ]
    result = compare_rl.main(argv)
    sweep = result["lr_sweep"]["rows"]
    assert {(r["method"], r["lr"], r["seed"]) for r in sweep} == {
        (m, lr, 100) for m in ("treerl", "chainrl-grpo") for lr in (1e-5, 1e-3)
    }
    assert result["learning_rates"] == {m: compare_rl.choose_lr(sweep, m) for m in ("treerl", "chainrl-grpo")}
    # What the rule chose from, per method and rate (means over the sweep's seeds), is recorded.
    finals = {(f["method"], f["lr"]): f for f in result["lr_sweep"]["finals"]}
    assert set(finals) == {(m, lr) for m in ("treerl", "chainrl-grpo") for lr in (1e-5, 1e-3)}
    assert all(
        f["seeds"] == 1 and f["final_accuracy"] == compare_rl.sweep_finals(sweep, m)[lr]["final_accuracy"]
        for (m, lr), f in finals.items()
    )
    assert {t["method"]: t["lr"] for t in result["summary"]} == result["learning_rates"]
    assert (tmp_path / "out" / "compare_rl_sweep.png").stat().st_size > 0
    # The sweep's rule reads final accuracies only: its runs are evaluated before and after training,
    # the comparison's every --eval_every steps.
    sweep_steps = {compare_rl.run_key(r): [] for r in sweep}
    for r in sweep:
        sweep_steps[compare_rl.run_key(r)].append(r["step"])
    assert all(steps[0] == 0 and len(steps) == 2 for steps in sweep_steps.values())
    assert max(steps[-1] for steps in sweep_steps.values()) > 1
    assert [r["step"] for r in result["rows"] if r["method"] == "treerl"][:3] == [0, 1, 2]
    assert (tmp_path / "runs" / "chainrl-grpo-seed0" / "checkpoints").is_dir()  # kept by default
    # The results file is the record: with the run folders gone, nothing is trained again.
    monkeypatch.setattr(compare_rl.train, "main", lambda argv: pytest.fail("trained again"))
    import shutil

    shutil.rmtree(tmp_path / "runs" / "treerl-seed0")
    again = compare_rl.main([*argv, "--jobs", "1"])
    assert again["rows"] == result["rows"] and again["lr_sweep"] == result["lr_sweep"]
    # A narrower invocation keeps the runs it does not use in the record, so the full one still
    # finds them all.
    treerl_only = compare_rl.main([*argv, "--methods", "treerl"])
    assert {r["method"] for r in treerl_only["rows"] + treerl_only["lr_sweep"]["rows"]} == {"treerl"}
    assert {r["method"] for r in treerl_only["other_recorded_rows"]} == {"chainrl-grpo"}
    assert compare_rl.main(argv)["rows"] == result["rows"]


def test_a_second_reading_at_equal_trained_responses_interpolates_each_run():
    def run(method, seed, trained, accuracy):
        return [
            {"method": method, "seed": seed, "step": i, "trained_sequences": t, "accuracy": a, "greedy_accuracy": a / 2}
            for i, (t, a) in enumerate(zip(trained, accuracy))
        ]

    rows = (
        run("treerl", 0, [0, 100, 200], [0.2, 0.4, 0.8])
        + run("treerl", 1, [0, 120, 240], [0.2, 0.5, 0.5])
        + run("chainrl-grpo", 0, [0, 60, 150], [0.2, 0.3, 0.6])
        + run("chainrl-grpo", 1, [0, 70, 160], [0.2, 0.4, 0.4])
    )
    reading = compare_rl.at_equal(rows, ["treerl", "chainrl-grpo"], "trained_sequences")
    assert reading["at"] == 150  # where the run with the fewest trained responses stopped
    treerl, grpo = reading["summary"]
    # treerl seed 0: halfway from 0.4 to 0.8; seed 1: a third of the way from 0.5 to 0.5.
    assert treerl["accuracy"] == pytest.approx((0.6 + 0.5) / 2)
    assert grpo["accuracy"] == pytest.approx((0.6 + 0.4) / 2) and grpo["greedy"] == pytest.approx(0.25)
    [difference] = reading["differences"]
    assert difference["comparison"] == "treerl - chainrl-grpo"
    assert difference["accuracy"] == pytest.approx(0.55 - 0.5)
    # Runs recorded before the field existed give no reading rather than a wrong one.
    assert (
        compare_rl.at_equal(
            [{k: v for k, v in r.items() if k != "trained_sequences"} for r in rows[:3]] + rows[3:],
            ["treerl", "chainrl-grpo"],
            "trained_sequences",
        )
        is None
    )
    # Nor do runs evaluated only at their start and end: the line between those is not a reading.
    ends_only = [r for r in rows if r["step"] != 1]
    assert compare_rl.at_equal(ends_only, ["treerl", "chainrl-grpo"], "trained_sequences") is None


def test_compare_rl_rejects_bad_flags():
    with pytest.raises(SystemExit):
        compare_rl.parse_args(["--methods", "treerl,ppo"])
    with pytest.raises(SystemExit):
        compare_rl.parse_args(["--lrs", "treerl=fast"])
    with pytest.raises(SystemExit, match="lr_warmup_ratio"):  # a share of steps the budget leaves open
        compare_rl.main(["--lr_warmup_ratio", "0.1"])
    with pytest.raises(SystemExit):  # the sweep's seeds must not be compared seeds
        compare_rl.parse_args(["--seeds", "0,1", "--lr_sweep", "1e-5,3e-5", "--sweep_seeds", "100,1"])
    with pytest.raises(SystemExit):
        compare_rl.parse_args(["--kl_coef", "-1"])
    with pytest.raises(SystemExit):
        compare_rl.parse_args(["--save_every", "-1"])


def test_compare_rl_learning_rate_choice_keeps_greedy_accuracy():
    # start: 30% avg@k, 80% greedy. 1e-4 has the best avg@k but loses 10 greedy points; 3e-5 is
    # the best of the rates that keep greedy accuracy within 2 points.
    def sweep(finals, seed=100):
        return [
            {"method": "treerl", "lr": lr, "seed": seed, "accuracy": a, "greedy_accuracy": g}
            for lr, (avg, greedy) in finals.items()
            for a, g in ((0.30, 0.80), (avg, greedy))
        ]

    assert compare_rl.choose_lr(sweep({1e-5: (0.33, 0.81), 3e-5: (0.36, 0.79), 1e-4: (0.40, 0.70)}), "treerl") == 3e-5
    # None keeps it: the rate that loses the least.
    assert compare_rl.choose_lr(sweep({1e-5: (0.33, 0.60), 3e-5: (0.36, 0.50)}), "treerl") == 1e-5
    # Two sweep seeds: the choice is made on their means. 3e-5 wins seed 100 but loses on the mean.
    two = sweep({1e-5: (0.34, 0.80), 3e-5: (0.36, 0.80)}) + sweep({1e-5: (0.36, 0.80), 3e-5: (0.32, 0.80)}, seed=101)
    assert compare_rl.choose_lr(two, "treerl") == 1e-5


def test_compare_rl_balances_a_kl_by_each_methods_advantage_and_logs_the_balance(tmp_path, coin_verifier):
    """--kl_coef c: each method's coefficient is c times its own mean |advantage| at the warm start,
    the one its runs train with; every evaluation point after the start carries the update's
    balance, and oracle blame is compared with the GRPO chains it moves."""
    argv = ["--methods", "chainrl-grpo,oracle", "--seeds", "0,1", "--budget", "150", "--eval_every", "1"]
    argv += ["--kl_coef", "0.5", "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs")]
    result = compare_rl.main([*argv, "--prompts_per_step", "3", *TINY])
    kl = result["kl"]
    assert kl["per_unit_advantage"] == 0.5 and result["settings"]["kl_coef"] == 0.0
    for method in ("chainrl-grpo", "oracle"):
        scale = kl["mean_abs_advantage_at_start"][method]
        assert 0 < scale < 3 and kl["coefficients"][method] == pytest.approx(0.5 * scale)
        run = json.loads((tmp_path / "runs" / f"{method}-seed0" / "config.json").read_text())
        assert run["kl_coef"] == pytest.approx(kl["coefficients"][method])
        points = [r for r in result["rows"] if r["method"] == method]
        starts, later = [p for p in points if p["step"] == 0], [p for p in points if p["step"] > 0]
        assert all(p[key] is None for p in starts for key in compare_rl.BALANCE)  # no step yet
        assert later and all(p["mean_abs_advantage"] >= 0 for p in later)
        updated = [p for p in later if p["pg_grad_norm"] is not None]  # a step may have no signal
        assert updated and all(p["pg_grad_norm"] > 0 and p["kl_grad_norm"] >= 0 for p in updated)
    assert [d["comparison"] for d in result["differences"]] == ["oracle - chainrl-grpo"]
    [difference] = result["differences"]
    assert difference["accuracy_t_low"] <= difference["accuracy"] <= difference["accuracy_t_high"]


def test_welch_interval():
    from eval.common import welch_interval

    mean, low, high = welch_interval([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    # se = sqrt(2.5 / 5); all the variance on one side gives 4 degrees of freedom: t = 2.776
    assert mean == 3.0 and high - mean == pytest.approx(2.776 * (2.5 / 5) ** 0.5) and low == pytest.approx(6 - high)
    assert welch_interval([0.5, 0.5], [0.4, 0.4]) == pytest.approx((0.1, 0.1, 0.1))


def test_bootstrap_difference():
    mean, low, high = compare_rl.bootstrap_difference([0.5, 0.5, 0.5], [0.4, 0.4, 0.4])
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    mean, low, high = compare_rl.bootstrap_difference([0.50, 0.54, 0.46, 0.52, 0.48], [0.40, 0.42, 0.38, 0.41, 0.39])
    assert mean == pytest.approx(0.1)
    assert low < mean < high and 0.05 < low and high < 0.15 and high - low < 0.07


def test_differences_compare_treerl_with_every_other_method():
    # Final points only matter: TreeRL ends at 0.5 on both seeds; the others end lower.
    finals = {"treerl": 0.5, "treerl-random": 0.45, "chainrl-grpo": 0.4, "chainrl-release": 0.3}
    rows = [
        {"method": m, "seed": seed, "step": step, "accuracy": acc if step else 0.2, "greedy_accuracy": 0.8}
        for m, acc in finals.items()
        for seed in (0, 1)
        for step in (0, 10)
    ]
    methods = ["treerl", "treerl-random", "chainrl-grpo", "chainrl-release"]
    diffs = compare_rl.differences(rows, methods)
    assert [d["comparison"] for d in diffs] == [  # the baselines first, then the ablation
        "treerl - chainrl-grpo",
        "treerl - chainrl-release",
        "treerl - treerl-random",
    ]
    assert [d["accuracy"] for d in diffs] == pytest.approx([0.1, 0.2, 0.05])
    assert all(d["greedy"] == 0 for d in diffs)
    assert compare_rl.differences(rows, ["chainrl-grpo", "chainrl-release"]) == []  # no TreeRL, nothing to compare
    # The oracle, the placebo and the fork-line variants are each compared with ChainRL-GRPO too.
    extra = {"oracle": 0.55, "placebo": 0.38, "treerl-fork-line": 0.46}
    rows += [
        {"method": m, "seed": seed, "step": step, "accuracy": acc if step else 0.2, "greedy_accuracy": 0.8}
        for m, acc in extra.items()
        for seed in (0, 1)
        for step in (0, 10)
    ]
    diffs = {d["comparison"]: d["accuracy"] for d in compare_rl.differences(rows, methods + list(extra))}
    assert diffs["oracle - chainrl-grpo"] == pytest.approx(0.15)
    assert diffs["placebo - chainrl-grpo"] == pytest.approx(-0.02)
    assert diffs["treerl-fork-line - chainrl-grpo"] == pytest.approx(0.06)
    assert diffs["treerl - treerl-fork-line"] == pytest.approx(0.04)


def test_greedy_flips_first_slip_and_counts():
    assert bench.first_slip("3+4=7\n7+9=17\n17-2=15\nAnswer: 15") == 1  # 16 written as 17
    assert bench.first_slip("2-2=0\n0-10=-9\n-9-9=-18\nAnswer: -18") == -1  # -10 written as -9
    assert bench.first_slip("3+4=7\nAnswer: 7") is None
    result = bench.compare_verdicts([1, 1, 0, 0, 1], [0, 1, 1, 0, 0], ["1+1=3", "", "", "", "no steps"])
    assert (result["right_to_wrong"], result["wrong_to_right"], result["broken"], result["fixed"]) == (
        2,
        1,
        [0, 4],
        [2],
    )
    assert result["first_slip_magnitude"] == {"1": 1, "None": 1}
    assert (result["accuracy_before"], result["accuracy_after"]) == (0.6, 0.4)


def test_greedy_flips_end_to_end(tmp_path, monkeypatch):
    # A stand-in verdict that depends on the answer and the problem: a barely trained model gives
    # the same answer everywhere, and some problems count it right.
    monkeypatch.setattr(
        rewards, "arith_reward", lambda response, gold: float((sum(map(ord, response)) + int(gold)) % 2 == 0)
    )
    sample = bench.HFBackend.sample

    def all_finished(self, *args, **kwargs):  # an untrained model never ends its answer
        groups = sample(self, *args, **kwargs)
        for group in groups:
            for s in group:
                s.finished = True
        return groups

    monkeypatch.setattr(bench.HFBackend, "sample", all_finished)
    cfg = policy.PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, warmup_steps=20, warmup_batch_size=16)
    before = warm_started_policy(str(tmp_path), cfg)
    model, tokenizer = policy.load_policy(str(before), cfg, torch.device("cpu"))
    for name, noise in (("same", 0.0), ("other", 0.5)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    flags = ["--eval_size", "16", "--max_new_tokens", "12", "--out", str(tmp_path / "out")]
    same = bench.main(["greedy-flips", "--before", str(before), "--after", str(tmp_path / "same"), *flags])
    assert (same["right_to_wrong"], same["wrong_to_right"]) == (0, 0) and same["problems"] == 16
    other = bench.main(["greedy-flips", "--before", str(before), "--after", str(tmp_path / "other"), *flags])
    assert other["right_to_wrong"] + other["wrong_to_right"] > 0  # other weights answer differently
    net = (other["wrong_to_right"] - other["right_to_wrong"]) / other["problems"]
    assert other["accuracy_after"] - other["accuracy_before"] == pytest.approx(net)
    assert json.loads((tmp_path / "out" / "greedy_flips.json").read_text())["broken"] == other["broken"]
    with pytest.raises(SystemExit):
        bench.main(["greedy-flips", "--before", str(tmp_path / "missing"), "--after", str(tmp_path / "same")])


def test_bench_throughput_writes_every_ratio(tmp_path):
    result = bench.main(
        [
            "throughput",
            "--models",
            "default",
            "--repeats",
            "1",
            "--prompts",
            "2",
            "--batch",
            "32",
            "--update_prompts",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["gen_vs_limit"] == result["gen_vs_limit"] > 0
    assert saved["sampler_share"] == saved["models"]["default"]["generation"]["sampler_share"] > 0
    assert saved["command"].startswith("python -m eval.bench throughput")
    default = saved["models"]["default"]
    (pair,) = default["tree_vs_chain"]
    assert pair["prompts"] == 2 and pair["forest_tokens"] == pair["forest_no_reuse_tokens"] > 0
    assert saved["tree_vs_chain"] == pair["tree_vs_chain"] > 0
    assert pair["forest_forward_passes"] > pair["chain_forward_passes"] > 0
    assert [u["L"] for u in default["update"]] == [1, 2]  # train.py's L, and one round deeper
    assert all(0 < u["unique_over_flat"] < 1 and u["packed_speedup"] > 0 for u in default["update"])


def test_bench_grows_the_search_of_its_flags():
    # A tiny random model and prompts: the forests have the shape of the flags, not a fixed one.
    subject = bench.build_subject("default", "cpu")
    parser = bench.build_parser()
    args = parser.parse_args(["throughput", "--M", "2", "--N", "1", "--L", "1", "--T", "3", "--max_new_tokens", "8"])
    cfg = bench.search_config(parser, args)
    prompts = bench.random_prompts(3, subject.vocab)
    forests, seconds = bench.grow_forests(bench.subject_backend(subject, 32), prompts, cfg)
    assert [len(tree.leaves(root)) for root in forests] == [cfg.forest_size] * 3 == [2 * (1 + 1 * 1 * 3)] * 3
    assert seconds["total"] >= seconds["chains"] > 0 and seconds["forks"] > 0
    with pytest.raises(SystemExit):
        bench.search_config(parser, parser.parse_args(["throughput", "--M", "0"]))


def test_bench_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["throughput", "--models", "7b", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # only greedy-flips passes other flags on to train.py
        bench.main(["throughput", "--config", "configs/cpu_long.yaml", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["no-such-measurement"])
    with pytest.raises(SystemExit):  # refused before TRL is imported or anything is trained
        bench.main(["trl", "--methods", "trl-grpo,ppo", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["throughput", "--device", "cuda", "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            bench.main(["gpu-memory", "--out", str(tmp_path)])


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs GNU time at /usr/bin/time")
def test_bench_train_run_records_time_memory_and_accuracy_per_seed(tmp_path):
    flags = [*TINY, "--steps", "2", "--prompts_per_step", "2", "--eval_every", "1", "--save_trees", "false"]
    out = bench.main(
        ["train-run", "--seeds", "3", "--runs_dir", str(tmp_path / "runs"), "--out", str(tmp_path), *flags]
    )
    written = json.loads((tmp_path / "train_run.json").read_text())
    assert written.pop("commit") and written == json.loads(json.dumps(out))  # the file leads with its commit
    (row,) = out["rows"]
    assert row["seed"] == 3 and out["config"]["seed"] == 3 and out["config"]["hidden_size"] == 32
    assert row["wall_seconds"] > 0 and 0.05 < row["max_rss_gib"] < 8
    assert [e["step"] for e in row["evaluations"]] == [0, 1, 2]
    assert row["evaluations"][-1]["sampled"] == row["accuracy_after"]
    assert row["mean_step"]["generated_tokens"] > 0 and row["generated_tokens"] > 0


def test_time_v_reads_wall_clock_and_peak_memory():
    report = (
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50\n\tMaximum resident set size (kbytes): 1048576\n"
    )
    assert bench.time_v(report) == (3723.5, 1.0)
    assert bench.time_v(report.replace("1:02:03.50", "4:10.25"))[0] == 250.25
    with pytest.raises(RuntimeError, match="time -v"):
        bench.time_v("no report")


# --------------------------------------------------------------------------------------------------
# eval/credit.py: advantages against the step truth
# --------------------------------------------------------------------------------------------------


def test_credit_measures_of_one_leaf():
    labels = ["prefix", "prefix", "first_wrong", "first_wrong", "after"]
    assert credit.leaf_auroc([1.0, 1.0, -1.0, -1.0, -1.0], labels) == 1.0
    assert credit.leaf_auroc([-1.0, 1.0, 1.0, 1.0, 0.0], labels) == 0.25  # one prefix token ties, one loses
    assert credit.leaf_auroc([0.0] * 5, labels) == 0.5  # one advantage for the whole leaf: no separation
    assert credit.leaf_auroc([0.0] * 2, ["prefix", "answer"]) is None  # no wrong step to separate
    truth = tasks.StepTruth(labels, [0, 0, 1, 1, 2])
    assert credit.leaf_localisation([1.0, 1.0, -2.0, -2.0, -1.0], truth) == 1.0
    assert credit.leaf_localisation([1.0, 1.0, -1.0, -1.0, -2.0], truth) == 0.0  # the line after is lower
    assert credit.leaf_localisation([-1.0] * 5, truth) == pytest.approx(1 / 3)  # a chain: a random guess


def test_forks_on_slip_count_the_forks_that_resample_the_first_wrong_step():
    tokenizer = build_char_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = "Compute 4+7-2.\n"  # 4+7=11, 11-2=9
    root = tree.Node(encode(prompt))
    chain = root.add(encode("4+7=11\n11-2=8\nAnswer: 8"), finished=True)
    # Fork 1 at the slipped "8" (offset 12): a hit. Fork 2 inside the right first step (offset 2): not.
    chain.split(12)
    chain.add(encode("9\nAnswer: 9"), finished=True)
    head_tail = chain.split(2)
    chain.add(encode("7=11\n11-2=9\nAnswer: 9"), finished=True)
    for leaf in tree.leaves(root):
        leaf.reward = rewards.arith_reward(decode(tree.response_tokens(leaf)), 9)
    assert [decode(tree.response_tokens(leaf)) for leaf in tree.leaves(root)][0] == "4+7=11\n11-2=8\nAnswer: 8"
    assert head_tail.tokens == encode("7=11\n11-2=")
    assert credit.forks_on_slip([root], credit.leaf_truths([root], [prompt], decode)) == (1, 2)


def test_blame_shares_split_the_downward_push_on_wrong_leaves_by_part():
    """A right and a wrong chain with GRPO advantages: a chain pushes every token of its wrong leaf
    down alike, so the shares are the parts' token counts; with oracle blame all of it is on the slip."""
    import random

    tokenizer = build_char_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = "Compute 4+7-2.\n"  # 4+7=11, 11-2=9
    root = tree.Node(encode(prompt))
    root.add(encode("4+7=11\n11-2=9\nAnswer: 9"), finished=True).reward = 1.0
    root.add(encode("4+7=11\n11-2=8\nAnswer: 8"), finished=True).reward = 0.0  # prefix 7, slip 7, after 9
    sequences = tree.to_sequences(root, tree.chain_advantages(root, "grpo"))
    stats = {"generated_tokens": 46, "reward": 0.5}
    shares = credit.score(treerl.Rollout(sequences, [root], stats), [prompt], decode, is_tree=False)
    assert shares["blame_prefix"] == pytest.approx(7 / 23) and shares["blame_slip"] == pytest.approx(7 / 23)
    assert shares["blame_after"] == pytest.approx(9 / 23)
    truth = lambda p, r, finished: tasks.arith_step_truth(decode(p), r, decode, finished)  # noqa: E731
    moved, _ = probes.relocate_blame(sequences, truth, "oracle", random.Random(0))
    oracle = credit.score(treerl.Rollout(moved, [root], stats), [prompt], decode, is_tree=False)
    assert (oracle["blame_prefix"], oracle["blame_slip"], oracle["blame_after"]) == (0.0, 1.0, 0.0)


def test_blame_shares_read_a_chat_response_with_the_chat_step_truth():
    """The chat rendering of the task (--task arith_chat) is scored with its own step truth: the
    same split as the plain test above, on "11 - 2 = 8" and the boxed answer."""
    tokenizer = build_char_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = "<|user|>\nWhat is 4 + 7 - 2? Put the final answer in \\boxed{}.\n<|assistant|>\n"
    prefix, slip, after = "4 + 7 = 11\n", "11 - 2 = 8\n", "The answer is \\boxed{8}."
    root = tree.Node(encode(prompt))
    root.add(encode("4 + 7 = 11\n11 - 2 = 9\nThe answer is \\boxed{9}."), finished=True).reward = 1.0
    root.add(encode(prefix + slip + after), finished=True).reward = 0.0
    sequences = tree.to_sequences(root, tree.chain_advantages(root, "grpo"))
    rollout = treerl.Rollout(sequences, [root], {"generated_tokens": 2 * len(prefix + slip + after), "reward": 0.5})
    shares = credit.score(rollout, [prompt], decode, False, "token", tasks.chat_arith_step_truth)
    total = len(prefix + slip + after)
    assert shares["blame_prefix"] == pytest.approx(len(prefix) / total)
    assert shares["blame_slip"] == pytest.approx(len(slip) / total)
    assert shares["blame_after"] == pytest.approx(len(after) / total)


def test_credit_quick_writes_every_source_and_reuses_its_points(tmp_path, coin_verifier, monkeypatch):
    argv = ["--quick", "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"), *TINY]
    result = credit.main(argv)
    sources = result["stages"]["warm-start"]["sources"]
    assert set(sources) == set(credit.SOURCES)
    assert sources["chains-grpo"]["M"] >= 2 and sources["treerl-nll"]["M"] == 4
    for entry in sources.values():
        for metric in ("localisation", "fork_on_slip", *credit.BLAME):
            mean = entry[metric]["mean"]
            assert mean is None or 0.0 <= mean <= 1.0
    assert (tmp_path / "out" / "credit.png").stat().st_size > 0
    # A second run reads every point back: no rollout at all.
    monkeypatch.setattr(treerl, "rollout", lambda *a, **k: pytest.fail("a recorded point was measured again"))
    again = credit.main(argv)
    assert again["stages"]["warm-start"]["sources"]["treerl-nll"]["per_seed"] == sources["treerl-nll"]["per_seed"]
    # Measuring some sources of a stage again keeps the others in credit.json.
    subset = credit.main([*argv, "--sources", "treerl-nll"])
    assert set(subset["stages"]["warm-start"]["sources"]) == set(credit.SOURCES)


def test_the_machine_line_names_the_cpu_and_the_kernels_torch_runs(monkeypatch):
    line = machine()
    assert cpu_model() in line and torch.backends.cpu.get_cpu_capability() in line
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "torch AVX2 kernels" in machine()  # what ATEN_CPU_CAPABILITY=avx2 shows


def test_bench_test_time_reads_pytests_counts():
    out = "....s.\n=== short test summary info ===\nSKIPPED [1] x\n534 passed, 3 skipped, 37 warnings in 277.35s (0:04:37)\n"
    assert bench.pytest_counts(out) == {"passed": 534, "skipped": 3, "warnings": 37}
    assert bench.pytest_counts("2 failed, 5 passed in 1.0s") == {"failed": 2, "passed": 5}
    with pytest.raises(RuntimeError, match="no pytest summary"):
        bench.pytest_counts("collected 0 items\n")
