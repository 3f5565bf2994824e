"""Tests for the benchmark harness (eval/evaluate.py, eval/benchmarks.py): the pass@k estimator, the
bench loaders and their errors, an "oracle" responder that must score 100%, and a run on a tiny
random model saved with save_pretrained."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import policy
import tasks
from eval import benchmarks, evaluate
from eval.evaluate import Generation, bench_metrics, k_values, pass_at_k

ROOT = Path(__file__).resolve().parents[1]


# The real benchmark files, for the tests that read them: the folder $TREERL_DATA names, else a
# shared/data folder beside the repository's folder where one is (this project's machines keep a
# copy there).
REAL_DATA = Path(os.environ.get(benchmarks.DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """Every test starts without $TREERL_DATA; the tests of it set it themselves."""
    monkeypatch.delenv(benchmarks.DATA_ENV, raising=False)


@pytest.fixture
def data_dir() -> Path:
    """REAL_DATA; the test skips without it."""
    if not all((REAL_DATA / bench.filename).exists() for bench in benchmarks.BENCHES.values()):
        pytest.skip(f"no benchmark files in {REAL_DATA} (set {benchmarks.DATA_ENV})")
    return REAL_DATA


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 1, 0.4),  # pass@1 = c/n
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (5, 0, 3, 0.0),  # nothing correct
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (4, 4, 4, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_and_stays_finite_for_large_n():
    for n in (1, 7, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
    assert 0 < pass_at_k(10_000, 3, 1_000) < 1  # C(10000, 1000) would overflow a float


@pytest.mark.parametrize("n, c, k", [(5, 2, 0), (5, 2, 6), (5, 6, 1), (5, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_k_values_are_powers_of_two_and_the_sample_count():
    assert k_values(1) == [1]
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="--samples"):
        k_values(0)


def test_bench_metrics_average_over_problems():
    metrics = bench_metrics([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert metrics["avg@2"] == pytest.approx(0.5)
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    assert list(metrics) == ["avg@2", "pass@1", "pass@2"]


# --------------------------------------------------------------------------------------------------
# Loader pieces
# --------------------------------------------------------------------------------------------------


def test_gold_answers_gsm8k_and_amc():
    assert benchmarks.gsm8k_gold("She makes 9 * 2 = $18.\n#### 1,018") == "1018"
    with pytest.raises(ValueError, match="####"):
        benchmarks.gsm8k_gold("no final line")
    assert benchmarks.number_text(27.0) == "27"
    assert benchmarks.number_text(2.5) == "2.5"
    assert benchmarks.number_text("\\frac{1}{2}") == "\\frac{1}{2}"


def test_mbpp_asserts_become_a_check_on_the_candidate():
    asserts = ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"]
    assert benchmarks.mbpp_entry_point(asserts) == "similar_elements"
    assert benchmarks.mbpp_entry_point(["assert sum(10,15) == 6"]) == "sum"  # MBPP 126 shadows a built-in
    check = benchmarks.mbpp_check(["assert check(70) == False"], "check")  # MBPP 56: a function named check
    assert check == "def check(candidate):\n    assert candidate(70) == False\n"


def test_humaneval_program_is_the_prompt_completed_or_replaced():
    problem = benchmarks.Problem(
        "humaneval",
        0,
        "HumanEval/x",
        "code",
        "",
        [],
        entry_point="add",
        completion_prefix='import math\ndef add(a, b):\n    """Add."""\n',
    )
    body = "    return a + b\n"
    assert benchmarks.program_for(problem, body) == problem.completion_prefix + body
    chat = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert benchmarks.program_for(problem, chat) == problem.completion_prefix + "\ndef add(a, b):\n    return a + b\n"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def no_model(prompts, n):
    raise AssertionError("no generation expected: the error must come first")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bench", "math501"], "unknown bench 'math501'"),
        (["--samples", "0"], "--samples"),
        (["--temperature", "-1"], "--temperature"),
        (["--backend", "sglang"], "--backend must be one of hf, vllm"),
        (["--bench", "math500", "--bench_file", "math500"], "NAME=FILE"),
        (["--bench", "math500", "--bench_file", "gsm8k=x.jsonl"], "--bench does not list"),
        (["--bench", "mine", "--bench_file", "mine=missing.jsonl"], "data file not found: missing.jsonl"),
    ],
)
def test_bad_input_fails_with_a_clear_message(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--data_dir", str(tmp_path), "--out", str(tmp_path / "out"), *extra], responder=no_model)


@pytest.mark.parametrize("bench", ["humaneval", "mbpp"])
def test_a_code_bench_without_a_sandbox_stops_before_any_sampling(tmp_path, no_bwrap, bench):
    for filename in ("HumanEval.jsonl.gz", "mbpp.jsonl"):
        text = "".join(json.dumps(row) + "\n" for row in FILE_ROWS[filename])
        (tmp_path / filename).write_bytes(gzip.compress(text.encode()) if filename.endswith(".gz") else text.encode())
    with pytest.raises(SystemExit, match="evaluate: error: no usable bubblewrap.*TREERL_SANDBOX=rlimit"):
        evaluate.main(
            ["--bench", bench, "--data_dir", str(tmp_path), "--out", str(tmp_path / "out")], responder=no_model
        )


def test_missing_bench_file_in_the_data_dir_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"aime24: data file not found: .*aime24\.jsonl"):
        evaluate.main(["--bench", "aime24", "--data_dir", str(tmp_path)], responder=no_model)


def test_model_is_required_without_a_responder():
    with pytest.raises(SystemExit, match="--model is required"):
        evaluate.main(["--bench", "math500"])


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "answer": "2"}, "{oops"])
    with pytest.raises(SystemExit, match=r"a\.jsonl:2: not valid JSON"):
        evaluate.main(["--bench", "mine", "--bench_file", f"mine={bad_json}"], responder=no_model)
    no_answer = write_jsonl(tmp_path / "b.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(SystemExit, match=r"b\.jsonl:2: mine row has no field 'answer'"):
        evaluate.main(["--bench", "mine", "--bench_file", f"mine={no_answer}"], responder=no_model)


def test_a_named_data_folder_must_exist_and_the_flag_comes_before_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(benchmarks.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match=r"\$TREERL_DATA .*missing: no such folder"):
        evaluate.main(["--bench", "math500"], responder=no_model)
    with pytest.raises(SystemExit, match=r"--data_dir .*elsewhere: no such folder"):
        evaluate.main(["--bench", "math500", "--data_dir", str(tmp_path / "elsewhere")], responder=no_model)


# --------------------------------------------------------------------------------------------------
# Where the data comes from: a folder, else the pinned hub copies, else an error that says what to get
# --------------------------------------------------------------------------------------------------

# Two or three problems of each bench as its hub copy holds them (keyed by dataset, config, split)...
HUB_ROWS = {
    ("HuggingFaceH4/MATH-500", None, "test"): [
        {"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2", "level": 1, "unique_id": "test/a/1.json"}
    ],
    ("AI-MO/aimo-validation-aime", None, "train"): [
        {"id": 0, "problem": "Old?", "answer": "7", "url": "https://a.org/wiki/index.php/2022_AIME_I_Problems/P_1"},
        {"id": 60, "problem": "Aya?", "answer": "204", "url": "https://a.org/wiki/index.php/2024_AIME_I_Problems/P_1"},
    ],
    ("opencompass/AIME2025", "AIME2025-I", "test"): [{"question": "Bases?", "answer": "70"}],
    ("opencompass/AIME2025", "AIME2025-II", "test"): [{"question": "Cake?", "answer": "468"}],
    ("AI-MO/aimo-validation-amc", None, "train"): [
        {
            "id": 0,
            "problem": "Cities?",
            "answer": 27.0,
            "url": "https://a.org/wiki/index.php/2023_AMC_12A_Problems/P_1",
        },
        {"id": 50, "problem": "Older?", "answer": 3.0, "url": "https://a.org/wiki/index.php/2022_AMC_12A_Problems/P_1"},
    ],
    ("openai/gsm8k", "main", "test"): [
        {"question": "Ducks?", "answer": "16-3-4=9\n#### 1,018"},
        {"question": "Robe?", "answer": "2+1=3\n#### 3"},
    ],
    ("openai/openai_humaneval", None, "test"): [
        {
            "task_id": "HumanEval/0",
            "prompt": "def same(x):\n",
            "canonical_solution": "    return x\n",
            "test": "def check(candidate):\n    assert candidate(1) == 1\n",
            "entry_point": "same",
        }
    ],
    ("google-research-datasets/mbpp", "full", "test"): [
        {"task_id": 11, "text": "Write same.", "code": "def same(x): return x", "test_list": ["assert same(1) == 1"]}
    ],
}
# ... and as the files under --data_dir hold the same problems (AIME 2024 / AMC 2023: one year, with a
# copy of the problem as "question"; GSM8K: numbered by idx).
FILE_ROWS = {
    "math500.jsonl": HUB_ROWS["HuggingFaceH4/MATH-500", None, "test"],
    "aime24.jsonl": [{"id": 60, "problem": "Aya?", "answer": "204", "question": "Aya?"}],
    "aime25.jsonl": [{"question": "Bases?", "answer": "70"}, {"question": "Cake?", "answer": "468"}],
    "amc23.jsonl": [{"id": 0, "problem": "Cities?", "answer": 27.0, "question": "Cities?"}],
    "gsm8k_test.jsonl": [
        {"question": "Ducks?", "answer": "16-3-4=9\n#### 1,018", "idx": 0},
        {"question": "Robe?", "answer": "2+1=3\n#### 3", "idx": 1},
    ],
    "HumanEval.jsonl.gz": HUB_ROWS["openai/openai_humaneval", None, "test"],
    "mbpp.jsonl": HUB_ROWS["google-research-datasets/mbpp", "full", "test"],
}


def fake_hub(monkeypatch, load_dataset) -> None:
    """`datasets.load_dataset` replaced (the `datasets` package itself need not be installed)."""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_rows_are_read_as_the_files_rows(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, name=None, *, split, revision):
        calls.append((path, revision))
        return [dict(row) for row in HUB_ROWS[path, name, split]]

    fake_hub(monkeypatch, load_dataset)
    for filename, rows in FILE_ROWS.items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (tmp_path / filename).write_bytes(gzip.compress(text.encode()) if filename.endswith(".gz") else text.encode())

    def graded(problems):
        return [(p.id, p.kind, p.question, p.gold, p.entry_point, p.completion_prefix) for p in problems]

    for name in benchmarks.BENCHES:
        from_hub = benchmarks.load_problems(*benchmarks.resolve_bench(name, {}, None))
        from_file = benchmarks.load_problems(*benchmarks.resolve_bench(name, {}, tmp_path))
        assert graded(from_hub) == graded(from_file), name
    pinned = {(hub.dataset, hub.revision) for hub in benchmarks.HUB.values()}
    assert set(calls) == pinned and all(len(revision) == 40 for _, revision in pinned)

    # End to end: no --data_dir and no $TREERL_DATA read the hub copies.
    prompts = {f"{q}\n{tasks.MATH_INSTRUCTION}\n": a for q, a in [("Ducks?", "\\boxed{1018}"), ("Robe?", "\\boxed{4}")]}
    summary = evaluate.main(["--bench", "gsm8k", "--out", str(tmp_path / "out")], responder=responder_from(prompts))
    assert summary["benches"]["gsm8k"]["n"] == 2 and summary["benches"]["gsm8k"]["avg@1"] == 0.5

    # The summary names the data by a hash of the problems, the same from the hub and from the folder,
    # and keeps the folder's name but not its path.
    from_folder = evaluate.main(
        ["--bench", "gsm8k", "--data_dir", str(tmp_path), "--out", str(tmp_path / "out2")],
        responder=responder_from(prompts),
    )
    fingerprint = summary["benches"]["gsm8k"]["problems_sha256"]
    assert from_folder["benches"]["gsm8k"]["problems_sha256"] == fingerprint and len(fingerprint) == 64
    assert from_folder["config"]["data_dir"] == tmp_path.name
    problems = benchmarks.load_problems(*benchmarks.resolve_bench("gsm8k", {}, tmp_path))
    problems[1].gold = "4"
    assert evaluate.problems_fingerprint(problems) != fingerprint


@pytest.mark.parametrize("hub", ["offline", "not installed"])
def test_without_data_or_hub_the_error_lists_the_files_and_their_sources(monkeypatch, hub):
    if hub == "offline":

        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (OfflineModeIsEnabled)")

        fake_hub(monkeypatch, load_dataset)
    else:
        monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--bench", "all"], responder=no_model)
    message = str(exit.value)
    assert "math500: no data folder is given" in message
    assert ("ConnectionError" if hub == "offline" else "`datasets` is not installed") in message
    for name, bench in benchmarks.BENCHES.items():
        assert bench.filename in message and benchmarks.HUB[name].dataset in message, name
    assert "--data_dir" in message and "TREERL_DATA" in message and "docs/evaluation.md" in message


def test_an_empty_data_folder_names_the_missing_file_and_lists_them_all(tmp_path, monkeypatch):
    monkeypatch.setenv(benchmarks.DATA_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--bench", "math500"], responder=no_model)
    message = str(exit.value)
    assert f"math500: data file not found: {tmp_path / 'math500.jsonl'}" in message
    assert all(bench.filename in message for bench in benchmarks.BENCHES.values())


def test_a_fresh_clone_without_data_or_network_is_told_what_to_get(tmp_path):
    """The command as a user first runs it: no data folder, and the hub out of reach (offline mode
    and an empty cache, so the answer is the same with or without a network)."""
    env = {key: value for key, value in os.environ.items() if key != benchmarks.DATA_ENV}
    cache = str(tmp_path / "hf")
    env.update(HF_HOME=cache, HF_HUB_CACHE=cache, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "eval.evaluate", "--model", "unused", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "math500: no data folder is given" in done.stderr
    assert all(bench.filename in done.stderr for bench in benchmarks.BENCHES.values())
    assert "docs/evaluation.md" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hub_dataset_without_datasets_installed_says_what_to_install():
    with pytest.raises(SystemExit, match="pip install datasets"):
        evaluate.main(["--bench", "mine", "--bench_file", "mine=some-org/some-dataset"], responder=no_model)


# --------------------------------------------------------------------------------------------------
# End to end with responders instead of a model
# --------------------------------------------------------------------------------------------------


def responder_from(texts: dict[str, str]):
    """A responder that answers each prompt with a fixed text (n copies)."""
    return lambda prompts, n: [[Generation(texts[prompt], num_tokens=1)] * n for prompt in prompts]


def test_custom_math_bench_from_a_file_end_to_end(tmp_path):
    """Needs no shared data: a user's own JSONL file, one right and one wrong answer."""
    source = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"problem": "What is 1/2 + 1/4?", "answer": "3/4"}, {"question": "2+2?", "answer": 4.0}],
    )
    answers = {"What is 1/2 + 1/4?": "so \\boxed{\\frac{3}{4}}", "2+2?": "\\boxed{5}"}
    texts = {f"{q}\n{tasks.MATH_INSTRUCTION}\n": a for q, a in answers.items()}
    summary = evaluate.main(
        ["--bench", "mine", "--bench_file", f"mine={source}", "--samples", "3", "--out", str(tmp_path / "out")],
        responder=responder_from(texts),
    )
    metrics = summary["benches"]["mine"]
    assert metrics["n"] == 2 and metrics["samples"] == 3
    assert metrics["avg@3"] == pytest.approx(0.5) and metrics["pass@2"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"], r["correct"]) for r in rows] == [
        (0, 0, 1.0),
        (0, 1, 1.0),
        (0, 2, 1.0),
        (1, 0, 0.0),
        (1, 1, 0.0),
        (1, 2, 0.0),
    ]
    assert rows[0]["extracted"] == "\\frac{3}{4}" and rows[3]["gold"] == "4"


def oracle_texts(names: list[str], limit: int, data_dir: Path) -> dict[str, str]:
    """The gold solution of each problem, keyed by its prompt: MATH500's answer in a box, HumanEval's
    prompt + canonical solution, MBPP's reference code in a fenced block."""
    texts = {}
    for name in names:
        bench, source = benchmarks.resolve_bench(name, {}, data_dir)
        for problem in benchmarks.load_problems(bench, source, limit):
            row = problem.row
            if name == "humaneval":
                text = row["prompt"] + row["canonical_solution"]
            elif name == "mbpp":
                text = f"Here is the function:\n```python\n{row['code']}\n```\n"
            else:
                text = f"The answer is $\\boxed{{{row['answer']}}}$."
            texts[benchmarks.prompt_for(problem, None)] = text
    return texts


def test_oracle_responder_scores_100_percent_and_a_wrong_one_0(tmp_path, data_dir, code_sandbox):
    names, limit = ["math500", "humaneval", "mbpp"], 3
    texts = oracle_texts(names, limit, data_dir)
    args = ["--bench", ",".join(names), "--limit", str(limit), "--samples", "2", "--data_dir", str(data_dir)]
    summary = evaluate.main(args + ["--out", str(tmp_path / "oracle")], responder=responder_from(texts))
    for name in names:
        assert summary["benches"][name]["avg@2"] == 1.0, name
        assert summary["benches"][name]["pass@2"] == 1.0, name
    wrong = {prompt: "```python\ndef nothing():\n    pass\n```\n\\boxed{-12345}" for prompt in texts}
    summary = evaluate.main(args + ["--out", str(tmp_path / "wrong")], responder=responder_from(wrong))
    for name in names:
        assert summary["benches"][name]["avg@2"] == 0.0, name


def test_tiny_random_model_over_every_bench(tmp_path, data_dir, code_sandbox):
    """The whole CLI path with a real (random) model loaded from a save_pretrained folder."""
    tokenizer = policy.build_char_tokenizer()
    model = policy.build_tiny_model(policy.PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    summary = evaluate.main(
        [
            "--model",
            str(tmp_path / "tiny"),
            "--bench",
            "all",
            "--limit",
            "2",
            "--samples",
            "2",
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
            "--data_dir",
            str(data_dir),
            "--out",
            str(out),
        ]
    )

    names = list(benchmarks.BENCHES)
    assert list(summary["benches"]) == names
    for metrics in summary["benches"].values():
        assert metrics["n"] == 2 and metrics["samples"] == 2
        assert {"avg@2", "pass@1", "pass@2", "truncated", "sampling"} <= set(metrics)
        assert 0.0 <= metrics["avg@2"] <= 1.0
        assert metrics["sampling"]["temperature"] == 0.6 and metrics["sampling"]["max_new_tokens"] == 4
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(names) * 2 * 2
    assert {"bench", "index", "prompt", "response", "extracted", "gold", "correct"} <= set(rows[0])
    assert all(row["num_tokens"] <= 4 for row in rows)
    assert json.loads((out / "summary.json").read_text())["benches"].keys() == summary["benches"].keys()
    table = (out / "summary.md").read_text()
    assert all(f"| {name} | 2 | 2 |" in table for name in names)


def test_an_interrupted_evaluation_resumes_and_samples_only_what_is_missing(tmp_path):
    """Batches are kept as they come; the rerun asks the responder for the rest only, and the
    outputs equal an uninterrupted run's (each batch has its own seed)."""
    problems = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]
    source = write_jsonl(tmp_path / "mine.jsonl", problems)
    asked: list[str] = []
    import torch

    def responder(prompts, n, fail_after=None):
        if fail_after is not None and len(asked) >= fail_after:
            raise KeyboardInterrupt
        asked.extend(prompts)
        # The answer depends on the seed: right when a seeded draw is even.
        return [[Generation(f"\\boxed{{{int(torch.randint(0, 2, ()))}}}", 1)] * n for _ in prompts]

    args = ["--bench", "mine", "--bench_file", f"mine={source}", "--batch_size", "6", "--samples", "2"]
    whole = evaluate.main(args + ["--out", str(tmp_path / "whole")], responder=responder)
    assert len(asked) == 10
    asked.clear()
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # 3 prompts a batch: stopped after two batches
        evaluate.main(args + ["--out", str(out)], responder=lambda p, n: responder(p, n, fail_after=6))
    assert len((out / "progress" / "mine.jsonl").read_text().splitlines()) == 1 + 2
    asked.clear()
    resumed = evaluate.main(args + ["--out", str(out)], responder=responder)
    assert len(asked) == 4  # the last two batches only
    assert not (out / "progress").exists()
    assert (out / "samples.jsonl").read_text() == (tmp_path / "whole" / "samples.jsonl").read_text()
    assert {k: v for k, v in resumed["benches"]["mine"].items() if k != "seconds"} == {
        k: v for k, v in whole["benches"]["mine"].items() if k != "seconds"
    }
    # Other settings start afresh rather than mixing responses.
    asked.clear()
    evaluate.main(args + ["--out", str(out), "--temperature", "1.0"], responder=responder)
    assert len(asked) == 10


def test_backend_vllm_without_vllm_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    source = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(SystemExit, match="requirements-cpu-vllm.txt"):
        evaluate.main(
            ["--model", "no-such-model", "--backend", "vllm", "--bench", "mine", "--bench_file", f"mine={source}"]
        )
