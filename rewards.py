"""Verifiers: the leaf rewards of TreeRL.

TreeRL (Hou et al., ACL 2025, arXiv 2506.11902) trains with *no reward model*. Every leaf of an
EPTree forest (one complete response) gets an outcome reward of 1 or 0 from a verifier, and the
process rewards of Eqs. 2-4 (tree.py) are computed purely from those leaf outcomes. A wrong
verifier silently trains the wrong thing, so this module is about one question: is this response's
final answer right?

Reading order, as a run needs them: 1. `arith_reward`, exact integer matching for the arithmetic
task the CPU default (`python train.py`) trains on; 2. math: `extract_answer` (the last
`\\boxed{...}`, then `Answer:`, `####` and `The answer is` fallbacks), `_math_equal` (equivalence
by `math-verify`) and `math_reward(s)`, which run that check in worker processes with a hard time
limit (`math_pool`); 3. `code_reward` (every test passes, run sandboxed) with `extract_program`.
Making the checks safe (killing a runaway sympy, sandboxing programs) is sandbox.py's business.

How the official release differs: it grades math answers with a *remote LLM judge* (an HTTP
service asked whether the response matches the reference) and has *no code verifier*. This code
follows the paper's rule-based outcome reward instead and keeps everything local and exact:
`math-verify` for mathematical equivalence, real execution for code, exact integer matching for
the arithmetic task. Nothing here needs a network or a GPU, and nothing imports a model.
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, localcontext

import sandbox

# Text markers after which a final answer starts. The tree search (tree.py) does not fork inside the
# answer: a fork there would only re-sample the answer, not the reasoning that leads to it.
ANSWER_MARKERS = ("Answer:", "\\boxed{", "####")

# =====================================================================================================
# 1. The arithmetic reward: what the default run (`python train.py`) uses
# =====================================================================================================

_FINAL_INTEGER = re.compile(r"\s*(-?\d{1,1000})\s*")


def arith_reward(response: str, gold: int | str) -> float:
    """1.0 iff the text after the LAST "Answer:" is exactly an integer equal to `gold`, with nothing
    but whitespace around it; else 0.0. ("Answer: 9." or "Answer: 9 apples" score 0.0.)"""
    try:
        gold_value = int(gold.strip()) if isinstance(gold, str) else int(gold)
    except (TypeError, ValueError):
        raise ValueError(f"arith_reward: gold answer must be an integer, got {gold!r}") from None
    _, marker, tail = response.rpartition("Answer:")
    match = _FINAL_INTEGER.fullmatch(tail) if marker else None
    return 1.0 if match and int(match.group(1)) == gold_value else 0.0


# =====================================================================================================
# 2. Math: answer extraction, equivalence, the rewards
# =====================================================================================================

# 2a. Answer extraction (pure string work, linear time, safe to run in the trainer process)

# `\boxed{...}` and `\fbox{...}`; `\boxed 5` (no braces) is accepted too, as LaTeX allows it.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_ARGUMENT = re.compile(r"[^\s${}]+")


def _brace_partners(text: str) -> dict[int, int]:
    """Map the index of every `{` that gets closed to the index of its closing `}`.

    Braces nest to any depth. An escaped brace (`\\{`, `\\}`, as in `\\boxed{\\{1,2\\}}`) is literal
    text and does not open or close a group; a stray `}` is ignored. One linear pass with a stack,
    no recursion: a 100k-character input, or thousands of unclosed boxes, cost one pass in total.
    """
    partners: dict[int, int] = {}
    open_braces: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if char == "{":
            open_braces.append(i)
        elif char == "}" and open_braces:
            partners[open_braces.pop()] = i
        i += 1
    return partners


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`, or None.

    "Last" follows the MATH convention: a solution may box intermediate results, the final answer is
    the last box. An unclosed last box (truncated response) is skipped and the previous one is used.
    """
    boxes = list(_BOX_COMMAND.finditer(text))
    partners = _brace_partners(text) if boxes else {}
    for match in reversed(boxes):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            if rest in partners:
                return text[rest + 1 : partners[rest]].strip()
        else:
            # `\boxed 5`: the argument is the next run of characters up to a space or `$`.
            bare = _BARE_ARGUMENT.match(text, rest)
            if bare and bare.group(0).rstrip(".,;"):
                return bare.group(0).rstrip(".,;")
    return None


def _clean_tail(fragment: str) -> str | None:
    """Tidy the text that follows an `Answer:`-style marker into a bare answer.

    Keeps the first line; if it is written in math mode (`$...$`, `\\(...\\)`), keeps the math;
    otherwise cuts at the end of the sentence (a period followed by a space, so `3.5` survives) and
    drops a trailing period. Returns None for an empty result.
    """
    line = fragment.strip().split("\n", 1)[0].strip()
    math_mode = re.match(r"^\$\$?(.+?)\$\$?|^\\\((.+?)\\\)", line)
    if math_mode:
        line = math_mode.group(1) or math_mode.group(2)
    else:
        line = re.split(r"\.\s", line, maxsplit=1)[0]
    line = line.strip().rstrip(".").strip()
    return line or None


# Fallback markers, tried in this order when there is no box. Each takes the *last* occurrence.
_ANSWER_COLON = re.compile(r"answer\s*:", re.IGNORECASE)  # "Answer: 5", "Final Answer: 5"
_GSM8K_HASHES = re.compile(r"####")  # GSM8K gold format: "#### 72"
_THE_ANSWER_IS = re.compile(r"the (?:final )?answer is\s*:?", re.IGNORECASE)


def _after_last(pattern: re.Pattern, text: str) -> str | None:
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    return _clean_tail(text[matches[-1].end() :])


def extract_answer(text: str) -> str | None:
    """The final answer written in a response, or None when there is none.

    Order: the last `\\boxed{...}` or `\\fbox{...}` (any depth of nested braces); else the text after
    the last `Answer:`; else after the last `####` (GSM8K); else after a final `The answer is`.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for pattern in (_ANSWER_COLON, _GSM8K_HASHES, _THE_ANSWER_IS):
        answer = _after_last(pattern, text)
        if answer:
            return answer
    return None


# 2b. Math equivalence (runs inside a worker process of sandbox.py: sympy can hang or eat memory)

# A number in e-notation ("1.5e3", "2E-4"). LaTeX has no such syntax, so math-verify's LaTeX parser
# reads "1.5e3" as 1.5*e*3; we rewrite it to "1.5\times10^{3}" first.
_E_NOTATION = re.compile(r"^([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)[eE]([-+]?\d+)$")

# Wrappers that turn a word into text in LaTeX; `\text{Evelyn}` and `Evelyn` are the same answer.
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{(.*)\}$")

# `\frac`-like and `\sqrt` commands, an optional root index `[3]`, and one TeX token: a command
# (`\pi`) or a single character other than a space or a brace.
_SHORTHAND_COMMAND = re.compile(r"\\(?:[cdt]?frac|sqrt)(?![A-Za-z])")
_ROOT_INDEX = re.compile(r"\s*\[[^\]]*\]")
_ONE_TOKEN = re.compile(r"\s*(\\[A-Za-z]+|[^\s{}\\])")


def _brace_shorthand(latex: str) -> str:
    """Brace the brace-less arguments of `\\frac`, `\\dfrac`, `\\tfrac`, `\\cfrac` and `\\sqrt`.

    TeX reads an argument without braces as exactly one token (one character or one command), and
    so does this: `\\frac12` and `\\frac1{2}` -> `\\frac{1}{2}`, `\\tfrac{1}2` -> `\\tfrac{1}{2}`,
    `\\frac\\pi2` -> `\\frac{\\pi}{2}`, `\\sqrt[3]2` -> `\\sqrt[3]{2}`, `\\frac123` -> `\\frac{1}{2}3`
    (3/2, as the answer renders; math-verify's own repair reads 1/23, and misses `\\pi` and `[3]`).
    Braced arguments are kept. One linear pass; braces are only inserted, nothing is removed.
    """
    partners = _brace_partners(latex)
    inserts: list[tuple[int, str]] = []
    for command in _SHORTHAND_COMMAND.finditer(latex):
        position, arguments = command.end(), 2
        if command.group().endswith("sqrt"):
            index = _ROOT_INDEX.match(latex, position)
            position, arguments = (index.end() if index else position), 1
        for _ in range(arguments):
            while position < len(latex) and latex[position].isspace():
                position += 1
            if position in partners:  # a braced argument: step over it
                position = partners[position] + 1
                continue
            token = _ONE_TOKEN.match(latex, position)
            if token is None:
                break
            inserts += [(token.start(1), "{"), (token.end(1), "}")]
            position = token.end()
    pieces, done = [], 0
    for position, brace in sorted(inserts, key=lambda insert: insert[0]):  # stable: `}{` stays in order
        pieces += [latex[done:position], brace]
        done = position
    return "".join(pieces) + latex[done:]


def _strip_math_delimiters(answer: str) -> str:
    """Remove surrounding `$...$`, `\\(...\\)` or `\\[...\\]` and outer whitespace."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


def _text_word(answer: str) -> str | None:
    """The lower-cased word if `answer` is a plain word answer (`\\text{Evelyn}`, `east`), else None.

    Why: math-verify parses a bare word as a product of one-letter symbols (M*o*n*d*a*y), and a
    product commutes, so an anagram could match. Word answers are compared as text instead. A gold
    answer counts as a word only when it is wrapped in `\\text{}`-like markup or has at least three
    letters, so single-letter answers such as a variable `x` or a choice `(B)` stay with math-verify.
    """
    answer = _strip_math_delimiters(answer).rstrip(".").strip()
    wrapped = _TEXT_WRAPPER.match(answer)
    if wrapped:
        answer = wrapped.group(1).strip()
    if not re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", answer):
        return None
    if len(answer) < (2 if wrapped else 3):
        return None
    return answer.lower()


def _as_boxed_latex(answer: str) -> str:
    """Wrap a bare answer as `\\boxed{...}` so math-verify's LaTeX extractor reads all of it.

    Parsing the bare string (e.g. `\\frac12`, `[1,2)`, `\\{1,2\\}`) finds nothing or only a fragment;
    inside `\\boxed{}` the whole answer is one LaTeX expression (checked on MATH500, see the tests).
    """
    answer = _brace_shorthand(_strip_math_delimiters(answer))
    number = _E_NOTATION.match(answer)
    if number:
        answer = f"{number.group(1)}\\times10^{{{int(number.group(2))}}}"
    return "\\boxed{" + answer + "}"


# Exact numbers with a power or function value beyond 10^(+-_MAX_DIGITS) (10^{10^{10}}) are equal
# only to the very same expression: evaluating them exactly could take minutes or all memory.
_MAX_DIGITS = 10_000


def _is_rounding_of(written: str, gold) -> bool:
    """True iff `written` is a decimal of at least 6 significant digits and the exact number `gold`
    (one with no decimal in it), rounded half-up or cut at the decimal's last digit, is that decimal:
    `3.14159` (cut) and `3.141593` (rounded) are pi, `0.333333` is 1/3, `-1.414214` is -sqrt 2; not
    `3.1416` or `0.33` (too few digits: they also round nearby wrong answers), nor `0.333334`. A gold
    that rounds to itself (7, 3/4) matches only itself. (Other graders' rules: docs/evaluation.md.)
    """
    import sympy

    if not re.fullmatch(r"[-+]?\d*\.\d+", written) or gold.atoms(sympy.Float):  # a plain decimal; a gold with none
        return False
    value = Decimal(written)
    _, digits, exponent = value.as_tuple()  # `3.14160`: digits 3,1,4,1,6,0; exponent -5
    if len(digits) < 6:
        return False
    numeric = sympy.N(gold, len(digits) + 20)  # 20 digits past the written ones: enough to round and cut
    if not numeric.is_Float:  # gold is complex, or exactly 0
        return False
    with localcontext(prec=len(digits) + 20):  # room for every written digit, and more
        exact, unit = Decimal(str(numeric)), Decimal(1).scaleb(exponent)  # unit 0.00001 for 3.14160
        near = abs(exact - value) < unit  # if not, neither a rounding nor a cut (nor cheap to quantize)
        return near and value in (exact.quantize(unit, ROUND_HALF_UP), exact.quantize(unit, ROUND_DOWN))


def _exact_equal(gold, answer, written: str = "") -> bool | None:
    """Exact equality of two parsed numbers, or None to leave the pair to math-verify's `verify`.

    Decided here: two finite numbers (integers, fractions, surds, powers, pi, logs, decimals), with
    no tolerance: 2^{-60} - 2^{-61} is not 0 (math-verify's 15-digit evaluation chops it to 0). A
    decimal is its exact value, unless `written` rounds an exact gold (`_is_rounding_of`). Left to
    math-verify (and its tolerance): percentages (50*UnevaluatedExpr(1/100)), symbols, equations,
    sets, tuples, intervals, matrices. Cheapest test first: the same expression; a rational
    difference; certified nonzero digits; else sympy's `equals` (minimal polynomials for surds).
    Sizes are checked innermost first: 9^{9^{9^9}} stops at its first huge level.
    """
    import sympy

    values = (gold, answer)
    not_plain = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan, sympy.UnevaluatedExpr)  # UE: a percent
    if not all(isinstance(v, sympy.Expr) and v.is_number and not v.has(*not_plain) for v in values):
        return None
    if gold == answer:
        return True
    bound = sympy.Float(f"1e{_MAX_DIGITS}")
    for node in [node for v in values for node in sympy.postorder_traversal(v)]:
        if isinstance(node, (sympy.Pow, sympy.Function)):
            size = abs(node.evalf(5))  # a Float carries any exponent: cheap even for 10^{10^{10}}
            if size != 0 and not 1 / bound < size < bound:
                return False
    if _is_rounding_of(written, gold):
        return True
    decimals = {f: sympy.Rational(str(f)) for v in values for f in v.atoms(sympy.Float)}
    difference = (gold - answer).xreplace(decimals).doit()
    if difference.is_Rational:
        return difference == 0
    try:
        if difference.evalf(15, strict=True) != 0:  # strict: every digit is certified
            return False
    except sympy.core.evalf.PrecisionExhausted:  # it cancels too far to tell: decide symbolically
        pass
    return difference.equals(0) is True


def _math_equal(answer: str, gold: str, seconds: int) -> bool:
    """True iff `answer` is mathematically equivalent to `gold`. Call only inside a worker.

    math-verify is used exactly as its authors intend: parse the gold first, then the answer, then
    `verify(gold, answer)` (verify is not symmetric: e.g. `x = 3` as an answer to gold `3` is
    accepted, an equation as gold is compared as an equation). Only the LaTeX extractor is enabled:
    the plain-expression extractor goes through sympy's `parse_expr`, which `eval`s text, and model
    text should never be evaluated. `seconds` is math-verify's own SIGALRM limit for each step; the
    pool's hard limit (a kill) backs it up for work that never returns to the interpreter. Two plain
    numbers are not left to verify's tolerance: `_exact_equal` decides them.
    """
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.grader import is_assignment_relation, is_equation, take_last_relation
    from math_verify.utils import timeout

    if "\\boxed" in gold or "\\fbox" in gold:  # a whole solution was passed as gold
        gold = extract_answer(gold) or ""
    if not gold.strip() or not answer.strip():
        return False
    gold_word = _text_word(gold)
    if gold_word is not None:
        return _text_word(answer) == gold_word
    config = [LatexExtractionConfig()]
    parsed_gold = parse(_as_boxed_latex(gold), extraction_config=config, parsing_timeout=seconds)
    parsed_answer = parse(_as_boxed_latex(answer), extraction_config=config, parsing_timeout=seconds)
    if not parsed_gold or not parsed_answer:
        return False
    gold_value, answer_value = parsed_gold[0], parsed_answer[0]
    # as verify reads `x = 3` against `3` (either way round): the right-hand side is the value
    if is_equation(answer_value) and not is_equation(gold_value):
        answer_value = take_last_relation(answer_value).rhs
    elif is_assignment_relation(gold_value) and not is_equation(answer_value):
        gold_value = take_last_relation(gold_value).rhs
    exact = timeout(seconds)(_exact_equal)(gold_value, answer_value, _strip_math_delimiters(answer))
    if exact is not None:
        return exact
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=seconds))


# 2c. The math rewards: checks in worker processes with a hard time limit

DEFAULT_MATH_TIMEOUT = 5.0  # seconds per check, from the moment a worker receives it


def math_pool(workers: int | None = None) -> sandbox.MathVerifierPool:
    """The worker pool that runs `_math_equal`: the process-wide one (2 workers, started on first
    use), or a fresh one of `workers` processes."""
    if workers is None:
        return sandbox.shared_pool(_math_equal, _warm_up)
    return sandbox.MathVerifierPool(_math_equal, workers, _warm_up)


def _warm_up() -> None:
    """Each new worker's first work: loads math-verify, sympy and the parser outside any time limit."""
    _math_equal("1", "1", 5)


def math_rewards(responses: list[str], golds: list[str], timeout: float = DEFAULT_MATH_TIMEOUT) -> list[float]:
    """Score many responses at once: 1.0 where the extracted answer is equivalent to the gold, else 0.0.

    The checks run in parallel on the pool's 2 workers, each with a hard limit of `timeout` seconds
    (a timed-out or failed check scores 0.0); a response without an answer scores 0.0 unchecked.
    """
    if len(responses) != len(golds):
        raise ValueError(f"math_rewards got {len(responses)} responses but {len(golds)} gold answers")
    answers = [extract_answer(response) for response in responses]
    to_check = [i for i, gold in enumerate(golds) if answers[i] is not None and gold is not None]
    checked = math_pool().check([(answers[i], str(golds[i])) for i in to_check], timeout) if to_check else []
    scores = dict(zip(to_check, checked))  # index -> score; a response not checked scores 0.0
    return [scores.get(i, 0.0) for i in range(len(responses))]


def math_reward(response: str, gold: str, timeout: float = DEFAULT_MATH_TIMEOUT) -> float:
    """1.0 if the final answer of `response` is mathematically equivalent to `gold`, else 0.0.

    Never hangs (hard limit of `timeout` seconds, enforced by killing a worker) and never raises for
    a malformed response. `gold` is the reference answer (`\\frac{1}{2}`) or a boxed solution.
    """
    return math_rewards([response], [gold], timeout)[0]


# =====================================================================================================
# 3. Code: the program passes every test, run sandboxed
# =====================================================================================================


def code_reward(program: str, tests: list[dict], **options) -> float:
    """1.0 iff `program` passes every test in the sandbox, else 0.0 (options as for `run_tests`)."""
    return 1.0 if sandbox.run_tests(program, tests, fail_fast=True, **options).all_passed else 0.0


_FENCED_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The program in a model response: the last ```python fenced block; else the last unlabelled
    fenced block; else the whole text."""
    blocks = [(language.lower(), body) for language, body in _FENCED_BLOCK.findall(response)]
    for wanted in (("python", "py", "python3"), ("",)):
        matching = [body for language, body in blocks if language in wanted]
        if matching:
            return matching[-1]
    return response
