"""Tests for tasks.py: the built-in arithmetic task (the format the trainer depends on) with
rewards.arith_reward, and tasks from JSONL files."""

import json
import random
import re

import pytest

import tasks
import train
from policy import build_char_tokenizer
from rewards import ANSWER_MARKERS, arith_reward
from tasks import (
    ArithProblem,
    TaskConfig,
    arith_dataset,
    arith_problem,
    arith_task,
    arith_teacher_solution,
    build_task,
    load_rows,
)


def evaluate_left_to_right(expression: str) -> int:
    tokens = re.findall(r"[+-]|\d+", expression)
    total = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        total = total + int(number) if op == "+" else total - int(number)
    return total


def test_exact_format_of_a_problem():
    problem = arith_problem(random.Random(0))
    assert isinstance(problem, ArithProblem)
    match = re.fullmatch(r"Compute (\d(?:[+-]\d){2,3})\.\n", problem.prompt)
    assert match, problem.prompt
    lines = problem.solution.split("\n")
    assert lines[-1] == f"Answer: {problem.answer}"
    assert len(lines) == len(re.findall(r"[+-]", match.group(1))) + 1  # one step per operator
    assert problem.answer == evaluate_left_to_right(match.group(1))


def test_worked_chain_is_correct_and_left_to_right():
    for problem in arith_dataset(300, seed=3):
        expression = problem.prompt[len("Compute ") : -len(".\n")]
        numbers = re.findall(r"\d+", expression)
        *steps, final = problem.solution.split("\n")
        running = int(numbers[0])
        for step, op, number in zip(steps, re.findall(r"[+-]", expression), numbers[1:]):
            result = running + int(number) if op == "+" else running - int(number)
            assert step == f"{running}{op}{number}={result}"
            running = result
        assert final == f"Answer: {running}" and problem.answer == running
        assert arith_reward(problem.solution, problem.answer) == 1.0


def test_operand_ranges_and_negative_intermediates():
    rng = random.Random(0)
    problems = [arith_problem(rng) for _ in range(2000)]
    assert any(re.search(r"=-\d+\n", p.solution) for p in problems)  # negative intermediates occur
    assert {p.prompt.count("+") + p.prompt.count("-") + 1 for p in problems} == {3, 4}
    first_operands = {int(re.match(r"Compute (\d+)", p.prompt).group(1)) for p in problems}
    assert first_operands == set(range(1, 10))  # 1-9 for the first operand
    other_operands = {int(x) for p in problems for x in re.findall(r"[+-](\d+)", p.prompt)}
    assert other_operands == set(range(0, 10))


def test_difficulty_knobs():
    for problem in arith_dataset(200, seed=1, n_operands=(2, 5), digits=2):
        operands = re.findall(r"\d+", problem.prompt)
        assert 2 <= len(operands) <= 5
        assert all(len(x) == 2 for x in operands)
    sizes = {len(re.findall(r"\d+", p.prompt)) for p in arith_dataset(200, seed=1, n_operands=(2, 5))}
    assert sizes == {2, 3, 4, 5}


def test_dataset_is_deterministic_distinct_and_respects_exclude():
    a = arith_dataset(500, seed=7)
    assert a == arith_dataset(500, seed=7)
    assert a != arith_dataset(500, seed=8)
    assert len({p.prompt for p in a}) == 500
    held_out = {p.prompt for p in arith_dataset(100, seed=123)}
    train = arith_dataset(1000, seed=7, exclude=held_out)
    assert not held_out & {p.prompt for p in train}


def test_exhaustive_request_and_too_many():
    everything = arith_dataset(180, seed=0, n_operands=(2, 2))  # 9 * 2 * 10 prompts exist
    assert len({p.prompt for p in everything}) == 180
    with pytest.raises(ValueError, match="allow only 180"):
        arith_dataset(181, seed=0, n_operands=(2, 2))
    excluded = {everything[0].prompt, "not a prompt"}
    with pytest.raises(ValueError, match="allow only 179"):
        arith_dataset(180, seed=0, n_operands=(2, 2), exclude=excluded)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"digits": 0}, "digits"),
        ({"n_operands": (1, 3)}, "at least 2"),
        ({"n_operands": (4, 3)}, "fewest <= most"),
        ({"n_operands": "many"}, "pair"),
    ],
)
def test_bad_knobs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arith_problem(random.Random(0), **kwargs)
    with pytest.raises(ValueError, match=message):
        arith_dataset(3, seed=0, **kwargs)


@pytest.mark.parametrize(
    "response, gold, reward",
    [
        ("4+7=11\n11-2=9\nAnswer: 9", 9, 1.0),
        ("Answer: 9", "9", 1.0),
        ("Answer:9  \n\n", 9, 1.0),
        ("Answer: -3", -3, 1.0),
        ("Answer: 8\nAnswer: 9", 9, 1.0),  # the last Answer: counts
        ("Answer: 9\nAnswer: 8", 9, 0.0),
        ("Answer: 9.", 9, 0.0),
        ("Answer: 9 apples", 9, 0.0),
        ("Answer: 9.0", 9, 0.0),
        ("Answer: 10", 9, 0.0),
        ("Answer: --9", 9, 0.0),
        ("Answer:", 9, 0.0),
        ("9", 9, 0.0),
        ("", 9, 0.0),
        ("answer: 9", 9, 0.0),
        ("Answer: " + "9" * 100_000, 9, 0.0),  # huge numbers are rejected cheaply
    ],
)
def test_arith_reward(response, gold, reward):
    assert arith_reward(response, gold) == reward


def test_arith_reward_rejects_a_bad_gold():
    with pytest.raises(ValueError, match="gold"):
        arith_reward("Answer: 3", "three")


def test_answer_markers():
    assert ANSWER_MARKERS == ("Answer:", "\\boxed{", "####")
    problem = arith_problem(random.Random(5))
    assert problem.solution.rfind(ANSWER_MARKERS[0]) == problem.solution.rindex("\n") + 1


def test_careless_teacher_slips_at_its_rate_and_carries_the_slip_on():
    problems = arith_dataset(400, seed=5)
    rng = random.Random(0)
    assert all(arith_teacher_solution(p.prompt, rng, 0.0) == p.solution for p in problems)
    slipped_steps = total_steps = wrong_answers = 0
    for p in problems:
        text = arith_teacher_solution(p.prompt, rng, 0.3)
        *steps, final = text.split("\n")
        running = int(re.match(r"-?\d+", steps[0]).group())
        for step in steps:
            left, op, right, result = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", step).groups()
            assert int(left) == running  # each step builds on the previous (possibly slipped) value
            exact = int(left) + int(right) if op == "+" else int(left) - int(right)
            assert abs(int(result) - exact) <= 2
            slipped_steps += int(result) != exact
            total_steps += 1
            running = int(result)
        assert final == f"Answer: {running}"
        wrong_answers += arith_reward(text, p.answer) == 0.0
    assert 0.25 < slipped_steps / total_steps < 0.35
    assert wrong_answers > 0


@pytest.mark.parametrize(
    "prompt,rate,message", [("Compute 1+2.\n", 1.5, "slip_rate"), ("What is 1+2?", 0.1, "not an arithmetic prompt")]
)
def test_careless_teacher_rejects_bad_input(prompt, rate, message):
    with pytest.raises(ValueError, match=message):
        arith_teacher_solution(prompt, random.Random(0), rate)


# --------------------------------------------------------------------------------------------------
# Tasks from JSONL files, and the held-out set
# --------------------------------------------------------------------------------------------------


def test_malformed_rows_name_the_file_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n' * 3)
    config = TaskConfig(task="math", data=str(data), eval_size=1)
    with pytest.raises(ValueError, match=r"train.jsonl:2: row has no field 'answer'"):
        build_task(config, build_char_tokenizer())
    data.write_text('{"problem": "1+1?", "answer": "2"}\nnot json\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid JSON"):
        load_rows(str(data))
    with pytest.raises(ValueError, match="no such data file"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_math_rows_become_prompts_with_renamed_fields(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i}+1?", "a": str(i + 1)}) + "\n" for i in range(5)))
    config = TaskConfig(task="math", data=str(data), eval_size=2, problem_field="q", answer_field="a")
    task = build_task(config, build_char_tokenizer())
    assert len(task.train) == 3 and len(task.eval) == 2
    assert task.train[0].prompt.startswith("What is 0+1?") and "\\boxed{}" in task.train[0].prompt
    assert task.eval[-1].gold == "5"


def test_arith_held_out_set_never_overlaps_training():
    task = arith_task(TaskConfig(eval_size=300), train_size=5_000)
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}
    assert all(e.solution for e in task.train)


def test_held_out_set_is_shared_across_seeds_and_never_trained_on():
    # The training seed (--seed) is not the task's: only --data_seed draws other problems.
    same = [build_task(train.parse_config(["--seed", str(s)]).task, None) for s in (0, 1)]
    assert [e.prompt for e in same[0].eval] == [e.prompt for e in same[1].eval]
    other = build_task(TaskConfig(data_seed=1), None)
    assert [e.prompt for e in other.eval] != [e.prompt for e in same[0].eval]
    for task in same + [other]:
        assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}


# --------------------------------------------------------------------------------------------------
# Step truth
# --------------------------------------------------------------------------------------------------

STEP_PROMPT = "Compute 4+7-2+5.\n"  # 4+7=11, 11-2=9, 9+5=14


@pytest.mark.parametrize(
    "response,expected",
    [
        ("4+7=11\n11-2=9\n9+5=14\nAnswer: 14", ["prefix", "prefix", "prefix", "answer"]),
        ("4+7=12\n12-2=10\n10+5=15\nAnswer: 15", ["first_wrong", "after", "after", "after"]),  # first step slips
        ("4+7=11\n11-2=8\n8+5=13\nAnswer: 13", ["prefix", "first_wrong", "after", "after"]),  # middle step
        ("4+7=11\n11-2=9\n9+5=15\nAnswer: 15", ["prefix", "prefix", "first_wrong", "after"]),  # last step
        ("4+7=11\n11-2=9\n9+5=14\nAnswer: 15", ["prefix", "prefix", "prefix", "first_wrong"]),  # wrong answer
        ("4+7=11\n11-2=9\nAnswer: 9", ["prefix", "prefix", "first_wrong"]),  # a step left out
        ("4+7=11\n11-2=", ["prefix", "prefix"]),  # cut off mid-step: nothing wrong yet
        ("4+7=11\n11-2=8", ["prefix", "first_wrong"]),  # cut off after a slip
        ("4+7=11\n12-2=10", ["prefix", "first_wrong"]),  # built on a wrong left side
        ("4+7=11\n11-2=9\n9+5=14\nAnswer: 1", ["prefix", "prefix", "prefix", "answer"]),  # cut in the answer
        ("4+7=11\n11-2=9\n9+5=14\n", ["prefix", "prefix", "prefix", "answer"]),  # cut after a final newline
        ("4+7=11\n", ["prefix", "prefix"]),  # cut after the first step's newline
        ("4+7=11\n11-2=9\n9+5=14\n9+", ["prefix", "prefix", "prefix", "first_wrong"]),  # a step too many
    ],
)
def test_line_labels_find_the_first_wrong_step(response, expected):
    assert tasks.line_labels(STEP_PROMPT, response) == expected


@pytest.mark.parametrize(
    "response,expected",
    [
        ("4+7=11\n11-2=9\n9+5=14\nAnswer: 14", ["prefix", "prefix", "prefix", "answer"]),
        ("4+7=11\n11-2=9\n9+5=14\nAnswer: 1", ["prefix", "prefix", "prefix", "first_wrong"]),  # ended short
        ("4+7=11\n11-2=", ["prefix", "first_wrong"]),  # ended mid-step
        ("4+7=11\n11-2=9\n9+5=14\n", ["prefix", "prefix", "prefix", "first_wrong"]),  # ended with no answer
    ],
)
def test_the_last_line_of_a_finished_response_is_judged_whole(response, expected):
    assert tasks.line_labels(STEP_PROMPT, response, finished=True) == expected


CHAT_STEP_PROMPT = "<|user|>\nWhat is 4 + 7 - 2 + 5? Put the final answer in \\boxed{}.\n<|assistant|>\n"


@pytest.mark.parametrize(
    "response,finished,expected",
    [
        ("4 + 7 = 11\n11 - 2 = 9\n9 + 5 = 14\nThe answer is \\boxed{14}.", True, ["prefix"] * 3 + ["answer"]),
        (
            "4 + 7 = 11\n11 - 2 = 8\n8 + 5 = 13\nThe answer is \\boxed{13}.",
            True,
            ["prefix", "first_wrong", "after", "after"],
        ),
        ("4 + 7 = 11\n11 - 2 = 9\n9 + 5 = 14\nThe answer is \\boxed{15}.", True, ["prefix"] * 3 + ["first_wrong"]),
        ("4 + 7 = 11\n11 - 2 = 9\n9 + 5 = 14\nThe answer is \\bo", False, ["prefix"] * 3 + ["answer"]),  # cut
        ("4 + 7 = 11\n11 - 2 = 9\n9 + 5 = 14\nThe answer is \\boxed{1", False, ["prefix"] * 3 + ["answer"]),
        ("4 + 7 = 11\n11 - 2 = 9\n9 + 5 = 14\nThe answer is \\boxed{1}.", True, ["prefix"] * 3 + ["first_wrong"]),
        ("4 + 7 = 11\n11 - ", False, ["prefix", "prefix"]),  # cut mid-step
        ("4 + 7 = 11\n", False, ["prefix", "prefix"]),  # cut after a newline
        ("4 + 7 = 11\nThe answer", False, ["prefix", "first_wrong"]),  # an answer before the steps are done
        ("Let me compute.\n4 + 7 = 11", True, ["first_wrong", "after"]),  # a line that is no step
    ],
)
def test_chat_step_truth_reads_the_chat_format_back_into_the_steps(response, finished, expected):
    tokenizer = build_char_tokenizer()
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    truth = tasks.chat_arith_step_truth(CHAT_STEP_PROMPT, ids, decode, finished)
    assert len(truth.labels) == len(ids)
    labelled = {line: label for label, line in zip(truth.labels, truth.lines)}  # lines with tokens
    assert labelled == {i: expected[i] for i in labelled} and max(labelled) < len(expected)
    with pytest.raises(ValueError, match="not a chat arithmetic prompt"):
        tasks.chat_arith_step_truth("Compute 4+7.\n", ids, decode, finished)


def test_the_chat_task_carries_the_chat_step_truth():
    task = tasks.build_task(tasks.TaskConfig(task="arith_chat", eval_size=4), build_char_tokenizer(), 100)
    example = task.eval[0]
    assert task.step_truth is tasks.chat_arith_step_truth
    tokenizer = build_char_tokenizer()
    ids = tokenizer(example.solution, add_special_tokens=False)["input_ids"]
    truth = task.step_truth(example.prompt, ids, lambda t: tokenizer.decode(t, skip_special_tokens=True), True)
    assert set(truth.labels) == {"prefix", "answer"}  # the gold solution is right throughout


def test_step_truth_labels_every_token_eos_included():
    tokenizer = build_char_tokenizer()
    response = "4+7=11\n11-2=8\n8+5=13\nAnswer: 13"
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truth = tasks.arith_step_truth(STEP_PROMPT, ids, lambda t: tokenizer.decode(t, skip_special_tokens=True))
    assert len(truth.labels) == len(ids) and truth.first_wrong_line == 1
    # One label per character; a newline belongs to the line it ends; EOS to the last line.
    assert truth.labels[:7] == ["prefix"] * 7 and truth.labels[7:14] == ["first_wrong"] * 7
    assert truth.labels[14:] == ["after"] * (len(ids) - 14) and truth.lines[-1] == 3
