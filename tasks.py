"""Tasks and data: what the policy is trained and evaluated on.

Skip this file on a first reading. train.py asks it for a `Task`: training and held-out examples,
a batch verifier (from rewards.py) and the text markers where a final answer starts. It holds

- the settings of the task (`TaskConfig`, part of train.py's command line);
- the built-in arithmetic task of the CPU default, with the careless teacher whose worked
  solutions give the warm start its slips (RL's headroom), and the same task asked of a chat model
  (`arith_chat`: the chat template, `\\boxed{}` answers graded by math-verify);
- math and code tasks from JSONL files (`load_rows`, with file-and-line errors), prompts in the
  tokenizer's chat template;
- held-out evaluation: greedy accuracy and avg@k.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import rewards
import sandbox
from settings import arg, check_choices


@dataclass
class TaskConfig:
    """What the policy learns and is scored on."""

    task: Literal["arith", "arith_chat", "math", "code"] = arg(
        "arith", "arith (built in), arith_chat (arith for a chat model: chat template, \\boxed{} answer), math or code"
    )
    data: str = arg("", "math/code: training JSONL file (or hub dataset id with `datasets` installed)")
    eval_data: str = arg("", "math/code: held-out JSONL file (default: the last eval_size rows of --data)")
    problem_field: str = arg("problem", "field holding the question")
    answer_field: str = arg("answer", "math: field holding the gold answer")
    tests_field: str = arg("tests", "code: field holding the tests")
    data_seed: int = arg(0, "arith: seed of the problem sets, fixed across --seed (the same held-out set)")
    arith_operands: str = arg("3,4", "arith: min,max number of operands")
    arith_digits: int = arg(1, "arith: digits per operand")
    warmup_slip_rate: float = arg(0.2, "arith: chance that the warm start's teacher slips on a step (off by 1-2)")
    eval_size: int = arg(200, "held-out problems (never used for training)")
    eval_samples: int = arg(4, "sampled responses per held-out problem for avg@k")

    def validate(self) -> None:
        check_choices(self, TaskConfig)
        if self.task in ("math", "code") and not self.data:
            raise ValueError(f"--task {self.task} needs --data (a JSONL file or hub dataset id)")
        if self.task == "code":  # its programs run only in a sandbox: without one, stop before any work
            try:
                sandbox.resolve_sandbox()
            except sandbox.SandboxUnavailable as error:
                raise ValueError(f"--task code: {error}") from None
        for name in ("eval_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.warmup_slip_rate < 1.0:
            raise ValueError(f"--warmup_slip_rate must be in [0, 1); got {self.warmup_slip_rate}")
        self.operand_range()

    def operand_range(self) -> tuple[int, int]:
        try:
            low, high = (int(x) for x in self.arith_operands.split(","))
        except ValueError:
            raise ValueError(f"--arith_operands must be two integers 'min,max'; got {self.arith_operands!r}") from None
        if not 2 <= low <= high:
            raise ValueError(f"--arith_operands needs 2 <= min <= max; got {self.arith_operands!r}")
        return low, high


@dataclass
class Example:
    prompt: str
    gold: object  # the gold answer (math, arith) or the tests (code)
    solution: str | None = None  # a worked solution, for the warm start


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    score: Callable[[list[str], list], list[float]]  # batch verifier: responses, golds -> rewards
    answer_markers: tuple[str, ...]
    # Worked solution for the warm start, drawn afresh each time (a noisy teacher); None: e.solution.
    teacher: Callable[[Example, random.Random], str] | None = None
    # Which line of a response goes wrong first (arith_step_truth), for --blame; None: not known.
    step_truth: Callable[[str, list[int], Callable[[list[int]], str], bool], StepTruth] | None = None


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def arith_train_size(warmup_examples: int, rl_prompts: int) -> int:
    """Problems in the arithmetic training pool: as many as the warm start and RL draw (at least
    one, at most 50,000)."""
    return min(max(warmup_examples, rl_prompts, 1), 50_000)


def build_task(cfg: TaskConfig, tokenizer, train_size: int | None = None) -> Task:
    """The task named by --task. `train_size`: problems in the arithmetic training pool (None: what
    train.py's default warm start draws); math and code take every row of their file."""
    if cfg.task in ("arith", "arith_chat"):
        task = arith_task(cfg, train_size or arith_train_size(600 * 48, 0))
        return task if cfg.task == "arith" else as_chat_task(task, tokenizer)
    rows = load_rows(cfg.data)
    held_out = load_rows(cfg.eval_data) if cfg.eval_data else rows[-cfg.eval_size :]
    if not cfg.eval_data:
        rows = rows[: -cfg.eval_size]
    if cfg.task == "math":

        def make(row):
            return Example(
                chat_prompt(tokenizer, f"{row[cfg.problem_field]}\n{MATH_INSTRUCTION}"), str(row[cfg.answer_field])
            )

        needed, score, markers = (cfg.problem_field, cfg.answer_field), rewards.math_rewards, ("\\boxed{",)
    else:

        def make(row):
            return Example(chat_prompt(tokenizer, row[cfg.problem_field]), row[cfg.tests_field])

        needed, score, markers = (cfg.problem_field, cfg.tests_field), code_rewards, ()
    source = cfg.eval_data or cfg.data
    for where, part in ((cfg.data, rows), (source, held_out)):
        for line, row in part:
            missing = [k for k in needed if k not in row]
            if missing:
                raise ValueError(
                    f"{where}:{line}: row has no field {missing[0]!r} "
                    f"(rename with --problem_field/--answer_field/--tests_field)"
                )
    if not rows:
        raise ValueError(f"{cfg.data}: no training rows left after holding out {cfg.eval_size}")
    return Task(cfg.task, [make(r) for _, r in rows], [make(r) for _, r in held_out], score, markers)


def arith_task(cfg: TaskConfig, train_size: int) -> Task:
    """The built-in task: multi-step integer arithmetic with a worked chain of steps. The held-out
    set is drawn first and excluded from everything the model trains on."""
    operands = cfg.operand_range()
    held_out = arith_dataset(cfg.eval_size, seed=10_000 + cfg.data_seed, n_operands=operands, digits=cfg.arith_digits)
    exclude = {p.prompt for p in held_out}
    train = arith_dataset(train_size, seed=cfg.data_seed, n_operands=operands, digits=cfg.arith_digits, exclude=exclude)
    as_example = lambda p: Example(p.prompt, p.answer, p.solution)  # noqa: E731
    score = lambda responses, golds: [rewards.arith_reward(r, g) for r, g in zip(responses, golds)]  # noqa: E731
    teacher = None
    if cfg.warmup_slip_rate > 0:
        teacher = lambda e, rng: arith_teacher_solution(e.prompt, rng, cfg.warmup_slip_rate)  # noqa: E731
    return Task(
        "arith",
        [as_example(p) for p in train],
        [as_example(p) for p in held_out],
        score,
        rewards.ANSWER_MARKERS,
        teacher,
        arith_step_truth,
    )


# The arithmetic task for a chat model (--task arith_chat): the same problems, asked in words through
# the tokenizer's chat template, with the answer in \boxed{} graded by math-verify (rewards.math_rewards),
# the format of the math benchmarks: "What is 4 + 7 - 2? ..." -> "4 + 7 = 11\n11 - 2 = 9\nThe answer is
# \boxed{9}."
CHAT_ARITH_QUESTION = "What is {}? Put the final answer in \\boxed{{}}."
_BETWEEN_NUMBERS = re.compile(r"(?<=\d)([+=-])")  # an operator or "=" right after a digit (not a minus sign)


def chat_arith_solution(solution: str) -> str:
    """A worked arithmetic solution in the chat format: spaced steps and a boxed answer."""
    *steps, answer = solution.split("\n")
    steps = [_BETWEEN_NUMBERS.sub(r" \1 ", step) for step in steps]
    return "\n".join(steps + [f"The answer is \\boxed{{{answer.removeprefix('Answer: ')}}}."])


def as_chat_task(task: Task, tokenizer) -> Task:
    """The arithmetic task rendered for a chat model; the teacher's slips carry over."""
    source = {}  # chat prompt -> the arithmetic prompt it renders, for the teacher

    def render(e: Example) -> Example:
        expression = _BETWEEN_NUMBERS.sub(r" \1 ", e.prompt.removeprefix("Compute ").removesuffix(".\n"))
        prompt = chat_prompt(tokenizer, CHAT_ARITH_QUESTION.format(expression))
        source[prompt] = e.prompt
        return Example(prompt, str(e.gold), chat_arith_solution(e.solution))

    teacher = None
    if task.teacher is not None:
        teacher = lambda e, rng: chat_arith_solution(task.teacher(Example(source[e.prompt], e.gold), rng))  # noqa: E731
    train, held_out = [render(e) for e in task.train], [render(e) for e in task.eval]
    return Task("arith_chat", train, held_out, rewards.math_rewards, ("\\boxed{",), teacher, chat_arith_step_truth)


def load_rows(source: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a JSONL file (optionally gzipped) or a hub dataset id."""
    path = Path(source)
    if not path.exists():
        if source.endswith((".jsonl", ".json", ".gz")):
            raise ValueError(f"no such data file: {source}")
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"{source!r} is not a file, and loading a hub dataset needs `pip install datasets`"
            ) from None
        return [(i + 1, dict(row)) for i, row in enumerate(datasets.load_dataset(source, split="train"))]
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{line_number}: expected a JSON object")
            rows.append((line_number, row))
    return rows


def chat_prompt(tokenizer, text: str) -> str:
    """The tokenizer's chat template when it has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\n"


def code_rewards(responses: list[str], tests: list) -> list[float]:
    """Run every program in the sandbox, two at a time (each run is its own process)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda r, t: rewards.code_reward(rewards.extract_program(r), t), responses, tests))


# --------------------------------------------------------------------------------------------------
# The built-in arithmetic task (what the CPU default trains on)
# --------------------------------------------------------------------------------------------------
#
# Multi-step integer arithmetic with + and - only, evaluated left to right, so the worked chain is
# unambiguous: "Compute 4+7-2.\n" -> "4+7=11\n11-2=9\nAnswer: 9". Intermediate results may be negative.
# Difficulty knobs: the number of operands and their digits. A tiny model learns the format in a few
# hundred supervised steps with 1-digit operands, which is what makes a CPU run of the full TreeRL
# loop possible; with two-digit operands it learns the arithmetic far more slowly, too slowly for a
# short warm start.


@dataclass(frozen=True)
class ArithProblem:
    prompt: str  # e.g. "Compute 4+7-2.\n"
    solution: str  # e.g. "4+7=11\n11-2=9\nAnswer: 9" (worked chain, left to right, one step per line)
    answer: int


def _check_arith_knobs(n_operands: tuple[int, int], digits: int) -> tuple[int, int]:
    """Validate the difficulty knobs; return (fewest, most) operands."""
    if isinstance(n_operands, int):
        n_operands = (n_operands, n_operands)
    try:
        fewest, most = (int(k) for k in n_operands)
    except (TypeError, ValueError):
        raise ValueError(f"n_operands must be a pair (fewest, most), got {n_operands!r}") from None
    if fewest < 2:
        raise ValueError(f"n_operands must allow at least 2 operands, got {n_operands!r}")
    if most < fewest:
        raise ValueError(f"n_operands must be (fewest, most) with fewest <= most, got {n_operands!r}")
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an integer >= 1, got {digits!r}")
    return fewest, most


def _operand_range(digits: int, first: bool) -> range:
    """Operands have exactly `digits` digits; with 1 digit, 0 is allowed except as the first one."""
    low = 10 ** (digits - 1)
    if digits == 1 and not first:
        low = 0
    return range(low, 10**digits)


def arith_problem(rng: random.Random, n_operands: tuple[int, int] = (3, 4), digits: int = 1) -> ArithProblem:
    """One random problem with its worked solution, drawn with `rng` (deterministic per rng state)."""
    fewest, most = _check_arith_knobs(n_operands, digits)
    count = rng.randint(fewest, most)
    first = _operand_range(digits, first=True)
    rest = _operand_range(digits, first=False)
    operands = [rng.choice(first)] + [rng.choice(rest) for _ in range(count - 1)]
    operators = [rng.choice("+-") for _ in range(count - 1)]
    expression = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(operators, operands[1:]))
    solution, answer = _worked_solution(operands, operators)
    return ArithProblem(prompt=f"Compute {expression}.\n", solution=solution, answer=answer)


def _worked_solution(
    operands: list[int], operators: list[str], rng: random.Random | None = None, slip_rate: float = 0.0
) -> tuple[str, int]:
    """The chain "a+b=r / r-c=s / Answer: s" and its final value. With `slip_rate` > 0, each step's
    result is off by 1 or 2 with that probability, and the chain carries on from the wrong value."""
    steps, total = [], operands[0]
    for op, x in zip(operators, operands[1:]):
        result = total + x if op == "+" else total - x
        if slip_rate and rng.random() < slip_rate:
            result += rng.choice((-2, -1, 1, 2))
        steps.append(f"{total}{op}{x}={result}")
        total = result
    steps.append(f"Answer: {total}")
    return "\n".join(steps), total


_ARITH_PROMPT = re.compile(r"Compute (\d+)((?:[+-]\d+)+)\.\n")


def _parse_arith_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """The operands and operators of an arithmetic prompt ("Compute 4+7-2.\n": [4, 7, 2], ["+", "-"])."""
    match = _ARITH_PROMPT.fullmatch(prompt)
    if not match:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    pairs = re.findall(r"([+-])(\d+)", match.group(2))
    return [int(match.group(1))] + [int(x) for _, x in pairs], [op for op, _ in pairs]


def arith_teacher_solution(prompt: str, rng: random.Random, slip_rate: float) -> str:
    """A worked solution to `prompt` from a careless teacher: every step slips (result off by 1 or 2)
    with probability `slip_rate`, independently, and later steps build on the slipped value, so a
    slip makes the final answer wrong. Supervised training on such a teacher gives a model whose
    most likely step is right but whose samples slip at about the teacher's rate: the headroom an
    outcome reward can remove, since the model already knows the right step."""
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"slip_rate must be in [0, 1], got {slip_rate!r}")
    return _worked_solution(*_parse_arith_prompt(prompt), rng, slip_rate)[0]


def _arith_space_size(fewest: int, most: int, digits: int) -> int:
    """How many distinct prompts the knobs allow."""
    first = len(_operand_range(digits, first=True))
    rest = len(_operand_range(digits, first=False))
    return sum(first * (2 * rest) ** (count - 1) for count in range(fewest, most + 1))


def _arith_prompt_in_space(prompt: str, fewest: int, most: int, digits: int) -> bool:
    """Whether `prompt` is one the knobs could generate (to count exclusions exactly)."""
    match = _ARITH_PROMPT.fullmatch(prompt)
    if not match:
        return False
    operands = [match.group(1)] + re.findall(r"[+-](\d+)", match.group(2))
    if not fewest <= len(operands) <= most:
        return False
    for index, operand in enumerate(operands):
        if str(int(operand)) != operand or int(operand) not in _operand_range(digits, first=index == 0):
            return False
    return True


def arith_dataset(
    n: int,
    seed: int,
    n_operands: tuple[int, int] = (3, 4),
    digits: int = 1,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[ArithProblem]:
    """`n` problems with distinct prompts, none of them in `exclude` (e.g. the held-out set's
    prompts), deterministic per `seed`. Raises ValueError if fewer than `n` such problems exist."""
    fewest, most = _check_arith_knobs(n_operands, digits)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    available = _arith_space_size(fewest, most, digits)
    available -= sum(_arith_prompt_in_space(p, fewest, most, digits) for p in exclude)
    if n > available:
        raise ValueError(
            f"asked for {n} distinct arithmetic problems but n_operands={n_operands}, digits={digits} "
            f"allow only {available} (after excluding {len(exclude)} prompts)"
        )
    rng = random.Random(seed)
    seen = set(exclude)
    problems = []
    while len(problems) < n:  # rejection sampling; near-exhaustive requests take longer but finish
        problem = arith_problem(rng, (fewest, most), digits)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


# --------------------------------------------------------------------------------------------------
# Step truth: which step of an arithmetic response went wrong, token by token
# --------------------------------------------------------------------------------------------------

# What each token of a response to the arithmetic task is, judged against the prompt (eval/credit.py
# scores per-token advantages against it):
#   prefix       a step line before the first wrong one (all of it right)
#   first_wrong  the first line that is wrong: a step whose left side, operator, operand or result is
#                not the true running computation (a slip, or a step built on an earlier one), or an
#                answer line that does not give the true result after right steps
#   after        every line after the first wrong one, the answer line included
#   answer       the answer line of a response whose steps are all right
STEP_LABELS = ("prefix", "first_wrong", "after", "answer")


@dataclass(frozen=True)
class StepTruth:
    """Per token of a response: its label (STEP_LABELS) and the index of the line it belongs to."""

    labels: list[str]
    lines: list[int]

    @property
    def first_wrong_line(self) -> int | None:
        return next((line for label, line in zip(self.labels, self.lines) if label == "first_wrong"), None)


def line_labels(prompt: str, response: str, finished: bool = False) -> list[str]:
    """The label of every line of `response` (split at newlines), by the rules above.

    A response that was cut off (`finished` False) ends in a line it may not have completed, which
    is judged as far as it goes: it is wrong only once it cannot grow into the true line. A cut
    step "11-2=", a cut answer "Answer: 1" when the answer is 14, and the empty line after a final
    newline are not wrong yet. A response cut before its answer line has no answer line. The last
    line of a finished response is judged whole, like every other line."""
    solution, answer = _worked_solution(*_parse_arith_prompt(prompt))
    truth = solution.split("\n")  # the right steps, then the right answer line
    steps = len(truth) - 1
    lines = response.split("\n")
    labels, wrong = [], False
    for i, line in enumerate(lines):
        if wrong:
            labels.append("after")
            continue
        if not finished and i == len(lines) - 1:  # possibly cut: right so far?
            right = i < len(truth) and truth[i].startswith(line)
            labels.append(("answer" if i == steps else "prefix") if right else "first_wrong")
        elif line.startswith("Answer:"):  # the answer line is checked by value
            right = i == steps and rewards.arith_reward(line, answer) == 1.0
            labels.append("answer" if right else "first_wrong")
        else:
            labels.append("prefix" if i < steps and line == truth[i] else "first_wrong")
        wrong = labels[-1] == "first_wrong"
    return labels


def step_truth_on_ids(task: Task, decode: Callable[[list[int]], str]):
    """`task.step_truth` as treerl.rollout takes it (probes.StepTruthFn: prompt and response token
    ids, and whether the response finished), or None for a task whose steps' truth is unknown."""
    if task.step_truth is None:
        return None
    return lambda prompt_ids, response_ids, finished: task.step_truth(
        decode(prompt_ids), response_ids, decode, finished
    )


def arith_step_truth(
    prompt: str, response_ids: list[int], decode: Callable[[list[int]], str], finished: bool = False
) -> StepTruth:
    """`line_labels` mapped onto tokens: a token belongs to the line of its first character (a
    newline ends its line); a token that decodes to nothing (EOS) to the line before it."""
    text = decode(response_ids)
    return _on_tokens(line_labels(prompt, text, finished), text, response_ids, decode)


_CHAT_ANSWER = "The answer is \\boxed{"
_CHAT_QUESTION = re.compile(re.escape(CHAT_ARITH_QUESTION.split("{}")[0]) + r"([\d +-]+)\?")


def plain_arith_line(line: str) -> str:
    """A line of a chat-format arithmetic response (chat_arith_solution) in the plain task's format,
    as far as it goes: "11 - 2 = 9" -> "11-2=9", "The answer is \\boxed{9}." -> "Answer: 9". A line
    cut inside "The answer is \\boxed{" reads as the start of an answer line ("A"); any other line
    is kept, spaces dropped, and so is judged as the step it spells."""
    if line.startswith(_CHAT_ANSWER):
        return "Answer: " + line.removeprefix(_CHAT_ANSWER).split("}")[0]
    if line and _CHAT_ANSWER.startswith(line):
        return "A"
    return line.replace(" ", "")


def chat_arith_step_truth(
    prompt: str, response_ids: list[int], decode: Callable[[list[int]], str], finished: bool = False
) -> StepTruth:
    """arith_step_truth for the chat rendering of the task (as_chat_task): the expression is read
    back from the chat prompt and every response line put into the plain format (plain_arith_line)
    before it is judged, line for line, so the labels land on the chat response's own tokens."""
    match = _CHAT_QUESTION.search(prompt)
    if not match:
        raise ValueError(f"not a chat arithmetic prompt: {prompt!r}")
    text = decode(response_ids)
    plain = "\n".join(plain_arith_line(line) for line in text.split("\n"))
    labels = line_labels(f"Compute {match.group(1).replace(' ', '')}.\n", plain, finished)
    return _on_tokens(labels, text, response_ids, decode)


def _on_tokens(labels: list[str], text: str, response_ids: list[int], decode) -> StepTruth:
    """Line labels of `text` (the decoded response) as a StepTruth over its tokens."""
    line_of_char = [i for i, line in enumerate(text.split("\n")) for _ in range(len(line) + 1)]
    token_lines, last = [], 0
    for k in range(len(response_ids)):
        start = len(decode(response_ids[:k]))
        last = line_of_char[start] if start < len(text) else last
        token_lines.append(last)
    return StepTruth([labels[line] for line in token_lines], token_lines)


# --------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------


def held_out_answers(
    backend, tokenizer, task: Task, k: int, max_new_tokens: int, temperature: float, top_p: float = 1.0
) -> tuple[list[str], list[float]]:
    """k responses to every held-out problem (problem by problem; temperature 0: greedy) and their
    verdicts. A response that never ended scores 0."""
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval]
    responses = [s for group in backend.sample(prompts, k, max_new_tokens, temperature, top_p) for s in group]
    texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in responses]
    verdicts = task.score(texts, [e.gold for e in task.eval for _ in range(k)])
    return texts, [v * s.finished for v, s in zip(verdicts, responses)]


def evaluate(
    backend,
    tokenizer,
    task: Task,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy: greedy (one response per problem) and avg@k over k = `samples` sampled
    responses at `temperature` (the mean accuracy, the metric RL directly optimises). A response
    that never ended scores 0."""
    result = {}
    for name, temp, k in (("greedy", 0.0, 1), ("sampled", temperature, samples)):
        torch.manual_seed(seed)
        _, verdicts = held_out_answers(backend, tokenizer, task, k, max_new_tokens, temp, top_p)
        result[name] = sum(verdicts) / len(verdicts)
    return result
