"""The evaluation benchmarks: where their rows come from, what the model is asked, how it is graded.

The paper reports TreeRL against ChainRL on math benchmarks (MATH500, AIME, AMC, ...) with the same
rule-based verifier it trains with, and this project adds two code benchmarks run in the sandbox of
`sandbox.py`. Each benchmark here is one `Bench` entry that knows three things:

* **where its rows are**: a JSONL file in the folder `--data_dir` (or `$TREERL_DATA`) names; with
  neither, the public copy on the Hugging Face hub at a pinned commit (`HubSource`); or a file /
  hub dataset the user names with `--bench_file` instead;
* **what the model is asked**: math problems get the standard instruction
  "Please reason step by step, and put your final answer within \\boxed{}." (the one `tasks.py`
  trains with), inside the tokenizer's chat template when it has one, plain text otherwise;
  code problems ask for a Python function;
* **how a response is graded**: math with `rewards.math_rewards` (last `\\boxed{}` answer,
  math-verify equivalence), code with `rewards.code_reward` (sandboxed execution; expected values
  never enter the sandbox).

| bench      | file                | question        | gold                                              |
|------------|---------------------|-----------------|---------------------------------------------------|
| math500    | math500.jsonl       | problem         | answer                                            |
| aime24     | aime24.jsonl        | problem         | answer                                            |
| aime25     | aime25.jsonl        | question        | answer                                            |
| amc23      | amc23.jsonl         | problem         | answer, a float like 27.0, written as "27"        |
| gsm8k      | gsm8k_test.jsonl    | question        | the number after "####" in answer (commas removed)|
| humaneval  | HumanEval.jsonl.gz  | prompt          | test + entry_point: `check(candidate)`            |
| mbpp       | mbpp.jsonl          | text, test_list | test_list (assert statements), as a `check`       |

Any other name given with `--bench_file NAME=FILE` is read as a math benchmark with a `problem`
(or `question`) and an `answer` field. docs/evaluation.md, "Getting the benchmark data", says where
each file comes from.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import rewards
from tasks import MATH_INSTRUCTION, chat_prompt, load_rows

# The environment variable that names the folder of benchmark files when --data_dir does not.
DATA_ENV = "TREERL_DATA"
DATA_DOC = "docs/evaluation.md"  # its section "Getting the benchmark data" says where the files come from


@dataclass
class Problem:
    """One benchmark problem, ready to be prompted and graded."""

    bench: str
    index: int  # 0-based position in the benchmark (after --limit)
    id: str  # the dataset's own id where it has one (unique_id, task_id, ...)
    kind: str  # "math" or "code"
    question: str  # what the model is asked, before the chat template
    gold: object  # math: the answer (str); code: tests for sandbox.run_tests
    entry_point: str = ""  # code: the function the tests call
    completion_prefix: str = ""  # HumanEval: the signature + docstring the program completes
    row: dict = field(default_factory=dict, repr=False)  # the raw data row


@dataclass(frozen=True)
class HubSource:
    """A bench's public copy on the Hugging Face hub, pinned to one commit of the dataset repository,
    and what makes its rows the rows of the bench's file (the parsers read both the same way)."""

    dataset: str
    revision: str  # a commit of the dataset repository: the rows cannot change under a result
    split: str = "test"
    configs: tuple[str | None, ...] = (None,)  # read one after the other (AIME 2025: part I, then part II)
    year: str = ""  # keep only the rows whose url is this year's (the AIMO sets hold several years)
    position_field: str = ""  # a field set to each row's 0-based position (GSM8K's idx)

    def __str__(self) -> str:
        """E.g. "hf:AI-MO/aimo-validation-aime@13f9e12 (train, 2024 rows)"."""
        configs = "+".join(config for config in self.configs if config)
        where = ", ".join(part for part in (configs, self.split, self.year and f"{self.year} rows") if part)
        return f"hf:{self.dataset}@{self.revision[:7]} ({where})"


@dataclass(frozen=True)
class Bench:
    name: str
    kind: str  # "math" or "code"
    filename: str  # default file under the data directory
    parse: Callable[[dict], dict]  # row -> Problem fields; a KeyError names a missing field
    select: Callable[[list[dict]], list[dict]] = lambda rows: rows  # which rows form the benchmark


# --------------------------------------------------------------------------------------------------
# Row parsers: one small function per data format
# --------------------------------------------------------------------------------------------------


def _first_field(row: dict, names: tuple[str, ...]):
    """The value of the first of `names` present in `row` (KeyError naming them all otherwise)."""
    for name in names:
        if name in row:
            return row[name]
    raise KeyError(" or ".join(names))


def number_text(value) -> str:
    """A gold answer as text; a float that is a whole number loses its ".0" (AMC's 27.0 -> "27")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def gsm8k_gold(solution: str) -> str:
    """GSM8K's final answer: the number after "####", thousands separators removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' line: {solution[-80:]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def math_parser(
    question=("problem", "question"), answer="answer", id_field="", gold: Callable[[object], str] = number_text
) -> Callable[[dict], dict]:
    """A parser for a math row: question text, gold answer (through `gold`), optional id field."""

    def parse(row: dict) -> dict:
        return {
            "question": str(_first_field(row, question)),
            "gold": gold(row[answer]),
            "id": str(row[id_field]) if id_field else "",
        }

    return parse


def parse_humaneval(row: dict) -> dict:
    """HumanEval: the model completes `prompt`; the benchmark's `check(candidate)` grades it.

    The test is a `check` test of `sandbox.run_tests`: the trusted judge runs the prompt (it may
    define helpers the check uses) and the check, and every call of `candidate` goes to the
    sandboxed program."""
    test = {"check": row["test"], "entry_point": row["entry_point"], "setup": row["prompt"]}
    return {
        "question": row["prompt"],
        "gold": [test],
        "id": str(row["task_id"]),
        "entry_point": row["entry_point"],
        "completion_prefix": row["prompt"],
    }


class _CallsTo(ast.NodeTransformer):
    """Rewrites every use of one name into `candidate`."""

    def __init__(self, name: str):
        self.name = name

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name("candidate", node.ctx), node) if node.id == self.name else node


def mbpp_entry_point(asserts: list[str]) -> str:
    """The function an MBPP task asks for: the first called name in its asserts that is not a
    built-in (`assert set(similar_elements(a, b)) == ...` -> similar_elements); when every called
    name is a built-in, the first one (task 126 asks for a function called `sum`)."""
    called = [
        node.func.id
        for text in asserts
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    if not called:
        raise ValueError(f"no function call in the MBPP tests {asserts!r}")
    return next((name for name in called if not hasattr(builtins, name)), called[0])


def mbpp_check(asserts: list[str], entry_point: str) -> str:
    """MBPP's assert statements as a HumanEval-style `def check(candidate)`.

    `sandbox.run_tests` has no "assert" test kind, and needs none: the asserts become the body of
    a check whose calls of the entry point are calls of `candidate`, so they run in the trusted
    judge exactly like HumanEval's and the program stays in the sandbox. Renaming the calls (rather
    than relying on the name being bound to the proxy) also covers tasks whose function is itself
    called `check` (MBPP 56 and 349)."""
    body = []
    for text in asserts:
        tree = _CallsTo(entry_point).visit(ast.parse(text))
        body.append("    " + ast.unparse(tree).replace("\n", "\n    "))
    return "def check(candidate):\n" + "\n".join(body) + "\n"


def parse_mbpp(row: dict) -> dict:
    """MBPP: the task text and its three asserts (shown to the model, as in the MBPP paper, so it
    knows the function's name); graded by those asserts."""
    asserts = list(row["test_list"])
    entry = mbpp_entry_point(asserts)
    test = {"check": mbpp_check(asserts, entry), "entry_point": entry, "setup": row.get("test_setup_code") or ""}
    question = (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n" + "\n".join(asserts) + "\n\n"
        "Write the function in a ```python code block."
    )
    return {"question": question, "gold": [test], "id": str(row["task_id"]), "entry_point": entry}


def mbpp_test_split(rows: list[dict]) -> list[dict]:
    """The standard MBPP test split is task ids 11-510 (500 tasks). A file that has none of them
    (a different export) is used whole."""
    split = [row for row in rows if isinstance(row.get("task_id"), int) and 11 <= row["task_id"] <= 510]
    return split or rows


# Where each bench's rows come from without a data directory: its public copy on the Hugging Face
# hub, pinned to a commit. The files under --data_dir have the same rows and fields
# (docs/evaluation.md names the file each came from): AIME 2024 and AMC 2023 are the 2024 and 2023
# rows of the AIMO validation sets, GSM8K's file numbers its rows (idx), MBPP's is the "full" set
# (its test split is task ids 11-510, what mbpp_test_split keeps of the file).
HUB = {
    "math500": HubSource("HuggingFaceH4/MATH-500", "ff5b20257d8185524591543f8ff5993951537bb8"),
    "aime24": HubSource("AI-MO/aimo-validation-aime", "13f9e12f613e720c2a2b2f345dd04b998a29494d", "train", year="2024"),
    "aime25": HubSource(
        "opencompass/AIME2025", "a6ad95f611d72cf628a80b58bd0432ef6638f958", configs=("AIME2025-I", "AIME2025-II")
    ),
    "amc23": HubSource("AI-MO/aimo-validation-amc", "69d78a4a2c840e82d69af6bc742bda09005f6316", "train", year="2023"),
    "gsm8k": HubSource(
        "openai/gsm8k", "e53f048856ff4f594e959d75785d2c2d37b678ee", configs=("main",), position_field="idx"
    ),
    "humaneval": HubSource("openai/openai_humaneval", "7dce6050a7d6d172f3cc5c32aa97f52fa1a2e544"),
    "mbpp": HubSource("google-research-datasets/mbpp", "4bb6404fdc6cacfda99d4ac4205087b89d32030c", configs=("full",)),
}

BENCHES: dict[str, Bench] = {
    "math500": Bench("math500", "math", "math500.jsonl", math_parser(("problem",), id_field="unique_id")),
    "aime24": Bench("aime24", "math", "aime24.jsonl", math_parser(("problem",), id_field="id")),
    "aime25": Bench("aime25", "math", "aime25.jsonl", math_parser(("question",))),
    "amc23": Bench("amc23", "math", "amc23.jsonl", math_parser(("problem",), id_field="id")),
    "gsm8k": Bench("gsm8k", "math", "gsm8k_test.jsonl", math_parser(("question",), id_field="idx", gold=gsm8k_gold)),
    "humaneval": Bench("humaneval", "code", "HumanEval.jsonl.gz", parse_humaneval),
    "mbpp": Bench("mbpp", "code", "mbpp.jsonl", parse_mbpp, select=mbpp_test_split),
}


def custom_math_bench(name: str) -> Bench:
    """A bench the user brings with --bench_file NAME=FILE: math, `problem`/`question` + `answer`."""
    return Bench(name, "math", "", math_parser())


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def parse_bench_list(text: str) -> list[str]:
    """ "math500,aime24" -> ["math500", "aime24"]; "all" -> every built-in bench."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--bench is empty; give one or more of " + ", ".join(BENCHES))
    if names == ["all"]:
        return list(BENCHES)
    if len(set(names)) != len(names):
        raise ValueError(f"--bench lists a benchmark twice: {text!r}")
    return names


def parse_bench_files(items: list[str]) -> dict[str, str]:
    """["math500=path.jsonl", "mine=org/dataset:test"] -> {"math500": "path.jsonl", ...}"""
    sources = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"--bench_file expects NAME=FILE_OR_HUB_ID, got {item!r}")
        sources[name.strip().lower()] = source.strip()
    return sources


def data_dir_from(flag: str) -> Path | None:
    """The folder of benchmark files: --data_dir when given, else $TREERL_DATA, else None (then each
    bench is read from its pinned hub copy). A folder that is named but missing is an error, never a
    silent switch to the hub."""
    named, origin = (flag, "--data_dir") if flag else (os.environ.get(DATA_ENV, ""), f"${DATA_ENV}")
    if not named.strip():
        return None
    folder = Path(named).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{origin} {named}: no such folder")
    return folder


def data_help() -> str:
    """What every error about missing benchmark data ends with: the file each bench is read from, the
    hub copy it matches, and where to read more."""
    width = max(len(bench.filename) for bench in BENCHES.values())
    rows = [f"  {name:<10} {bench.filename:<{width}}  {HUB[name]}" for name, bench in BENCHES.items()]
    return (
        f"Put the benchmark files in a folder and pass it with --data_dir DIR (or set {DATA_ENV}=DIR);\n"
        f"each bench's file, then the pinned Hugging Face hub copy it is read from without a folder:\n"
        + "\n".join(rows)
        + f'\nSee {DATA_DOC}, "Getting the benchmark data".'
    )


def resolve_bench(name: str, sources: dict[str, str], data_dir: Path | None) -> tuple[Bench, str | HubSource]:
    """The Bench for `name` and the source to read it from: a file path or hub dataset id the user
    gave, the bench's file in `data_dir`, or (without a data directory) its pinned hub copy."""
    if name in sources:
        return BENCHES.get(name) or custom_math_bench(name), sources[name]
    if name not in BENCHES:
        raise ValueError(
            f"unknown bench {name!r}: choose from {', '.join(BENCHES)} "
            f"(or give a file for a new math bench with --bench_file {name}=FILE.jsonl)"
        )
    if data_dir is None:
        return BENCHES[name], HUB[name]
    path = data_dir / BENCHES[name].filename
    if not path.exists():
        raise ValueError(
            f"{name}: data file not found: {path} (or name another file with --bench_file {name}=FILE.jsonl)\n"
            + data_help()
        )
    return BENCHES[name], str(path)


def read_pinned(hub: HubSource, bench: str) -> list[tuple[int, dict]]:
    """(position from 1, row) pairs of a pinned hub copy, its rows made the rows of the bench's file.
    Needs the optional `datasets` package, and a network unless the copy is in the local hub cache;
    without them the error says which files to get instead."""
    try:
        import datasets

        rows = [
            dict(row)
            for config in hub.configs
            for row in datasets.load_dataset(hub.dataset, config, split=hub.split, revision=hub.revision)
        ]
    except Exception as error:  # no `datasets`, no network, a moved dataset: the remedy is the same
        why = "`datasets` is not installed" if isinstance(error, ImportError) else type(error).__name__
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{bench}: no data folder is given (--data_dir or ${DATA_ENV}) and its hub copy {hub} "
            f"could not be read ({why}: {first_line})\n" + data_help()
        ) from None
    if hub.year:
        rows = [row for row in rows if f"/{hub.year}_" in str(row.get("url", ""))]
    if hub.position_field:
        rows = [{**row, hub.position_field: i} for i, row in enumerate(rows)]
    return list(enumerate(rows, 1))


def read_hub(dataset_id: str) -> list[tuple[int, dict]]:
    """Rows of a hub dataset, "org/name" or "org/name:split" (default split: test). Needs the
    optional `datasets` package and a network the first time."""
    name, _, split = dataset_id.partition(":")
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{dataset_id!r} is not a local file, and reading a hub dataset needs `pip install datasets`"
        ) from None
    return [(i + 1, dict(row)) for i, row in enumerate(datasets.load_dataset(name, split=split or "test"))]


def looks_like_file(source: str) -> bool:
    """Whether a source that does not exist was meant as a file (so: a missing file, not a hub id)."""
    return source.endswith((".jsonl", ".json", ".gz")) or source.startswith((".", "/", "~"))


def load_problems(bench: Bench, source: str | HubSource, limit: int = 0) -> list[Problem]:
    """The benchmark's problems from `source` (file, hub id or pinned hub copy), the first `limit`
    when limit > 0."""
    if isinstance(source, HubSource):
        numbered = read_pinned(source, bench.name)
    elif Path(source).expanduser().exists():
        numbered = load_rows(str(Path(source).expanduser()))
    elif looks_like_file(source):
        raise ValueError(f"{bench.name}: data file not found: {source}")
    else:
        numbered = read_hub(source)
    line_of = {id(row): line for line, row in numbered}
    rows = bench.select([row for _, row in numbered])
    if limit > 0:
        rows = rows[:limit]
    problems = []
    for index, row in enumerate(rows):
        try:
            fields = bench.parse(row)
        except KeyError as missing:
            raise ValueError(
                f"{source}:{line_of[id(row)]}: {bench.name} row has no field {missing.args[0]!r}"
            ) from None
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{source}:{line_of[id(row)]}: {bench.name}: {error}") from None
        problems.append(Problem(bench=bench.name, index=index, kind=bench.kind, row=row, **fields))
    if not problems:
        raise ValueError(f"{bench.name}: no rows in {source}")
    return problems


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Write the whole function in a ```python code block."


def prompt_for(problem: Problem, tokenizer) -> str:
    """The text the model is given. With a chat template, every bench is one user turn. Without
    one (a base model, or no tokenizer), HumanEval is the raw prompt to be continued, the usual
    base-model protocol, and the other benches are their question as plain text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if problem.kind == "math":
        return chat_prompt(tokenizer, f"{problem.question}\n{MATH_INSTRUCTION}")
    if problem.completion_prefix:  # HumanEval
        if not has_template:
            return problem.completion_prefix
        return chat_prompt(tokenizer, f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem.completion_prefix}```")
    return chat_prompt(tokenizer, problem.question)  # MBPP


# --------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------


def program_for(problem: Problem, response: str) -> str:
    """The program a code response stands for.

    The code is the last ```python block of the response (else the whole text). For HumanEval, a
    response that defines the entry point is run after the prompt (which brings the imports and
    helper functions the prompt defines; the response's definition replaces the prompt's stub);
    a response that does not (a base model continuing the prompt) is appended to the prompt."""
    code = rewards.extract_program(response)
    if not problem.completion_prefix:
        return code
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return problem.completion_prefix + "\n" + code
    return problem.completion_prefix + code


def grade(
    problems: list[Problem], responses: list[str], code_timeout: float = 10.0, code_workers: int = 2
) -> tuple[list[str | None], list[float]]:
    """(extracted answer or program, correctness 0/1) for each (problem, response) pair.

    Math answers are checked in a batch through the verifier pool of `rewards.py`; programs run in
    the sandbox, `code_workers` at a time (each run is its own process)."""
    if len(problems) != len(responses):
        raise ValueError(f"grade got {len(problems)} problems but {len(responses)} responses")
    extracted: list[str | None] = [None] * len(responses)
    correct = [0.0] * len(responses)
    math_at = [i for i, p in enumerate(problems) if p.kind == "math"]
    code_at = [i for i, p in enumerate(problems) if p.kind == "code"]
    if math_at:
        scores = rewards.math_rewards([responses[i] for i in math_at], [problems[i].gold for i in math_at])
        for i, score in zip(math_at, scores):
            extracted[i], correct[i] = rewards.extract_answer(responses[i]), score
    if code_at:
        programs = [program_for(problems[i], responses[i]) for i in code_at]
        run = lambda program, i: rewards.code_reward(program, problems[i].gold, timeout=code_timeout)  # noqa: E731
        with ThreadPoolExecutor(max_workers=code_workers) as pool:
            scores = list(pool.map(run, programs, code_at))
        for i, program, score in zip(code_at, programs, scores):
            extracted[i], correct[i] = program, score
    return extracted, correct
