"""Render every measured figure in README.md and docs/*.md from the JSON files under results/.

    python -m eval.report            # rewrite the figures in place
    python -m eval.report --check    # exit 1, listing the files, if any figure differs from its file

A figure in the docs is never typed by hand: it sits between two markers that name the results file
it comes from and the expression that reads it, and this command writes what the expression gives
between them. Two kinds of marker, both HTML comments, so they vanish where Markdown is rendered:

    avg@4 rose from <!-- fig default/train_run.json: pct(rows[0].accuracy_before) -->37.1%<!-- /fig -->

    <!-- table default/train_run.json:
    table(["seed", "wall time"], [[r.seed, f"{r.wall_seconds:.0f} s"] for r in rows])
    -->
    | seed | wall time |
    |---|---|
    | 0 | 250 s |
    <!-- /table -->

A `fig` is inline (in a sentence or a table cell); a `table` is a block of lines. The path is
relative to results/; the expression is Python, evaluated with the file's top-level keys as names
(a key that is not a name is read as `data["avg@4"]`; nested objects also read as `a.b`), and
the formatting helpers below (`pct`, `pts`, `num`, `table`, `source`, `mean`). `source()` gives the
line that belongs beside every table: the machine, the command and the commit the file records.

The drift test (tests/test_report.py) runs `--check`, as `ruff format --check` does for code, and
a second test fails on any measured-looking figure in the docs that no marker renders.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md")

# An inline figure, and a block table. The expression of either may not contain "-->".
FIG = re.compile(r"<!-- fig (?P<file>[^:\s]+): (?P<expr>.+?) -->(?P<value>.*?)<!-- /fig -->")
TABLE = re.compile(r"<!-- table (?P<file>[^:\s]+):\n(?P<expr>.*?)\n-->\n(?P<value>.*?)<!-- /table -->", re.S)


class Record(dict):
    """A JSON object whose keys also read as attributes: `rows[0].seed` as well as `rows[0]["seed"]`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no key {name!r} (keys: {', '.join(self)})") from None


@cache
def load(path: Path) -> Record:
    """A results file, its objects as Records."""
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    return json.loads(path.read_text(), object_hook=Record)


# --------------------------------------------------------------------------------------------------
# The helpers an expression may use
# --------------------------------------------------------------------------------------------------


def pct(fraction: float, digits: int = 1) -> str:
    """0.3711 -> "37.1%"."""
    return f"{100 * fraction:.{digits}f}%"


def pts(fraction: float, digits: int = 1) -> str:
    """A difference of two fractions in percentage points, signed: 0.155 -> "+15.5", -0.02 -> "−2.0"."""
    return num(100 * fraction, digits, signed=True)


def num(value: float, digits: int = 0, signed: bool = False) -> str:
    """A number with thousands separators and a true minus sign: 61919 -> "61,919"."""
    text = f"{value:+,.{digits}f}" if signed else f"{value:,.{digits}f}"
    return text.replace("-", "−")


def mean(values) -> float:
    return statistics.fmean(values)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def source_line(data: Record, name: str) -> str:
    """Where a file's figures come from: the machine, the command and the commit it records."""
    parts = [f"[`results/{name}`](RESULTS/{name})"]
    if "machine" in data:
        parts.append(f"machine: {data['machine']}")
    if "command" in data:
        parts.append(f"command: `{data['command']}`")
    if "commit" in data:
        parts.append(f"commit: {str(data['commit'])[:10]}")
    return "; ".join(parts) + "."


def evaluate(name: str, expr: str, doc: Path) -> str:
    """What the expression gives for the results file `name`, as text; an error names the doc and the marker."""
    data = load(ROOT / "results" / name)
    names = {"data": data, **{key: value for key, value in data.items() if key.isidentifier()}}
    helpers = {"pct": pct, "pts": pts, "num": num, "mean": mean, "table": table, "math": math}
    helpers["source"] = lambda: source_line(data, name).replace("RESULTS/", results_link(doc))
    try:
        # One namespace, so that a comprehension inside a comprehension sees the file's names too.
        value = eval(expr, {"__builtins__": __builtins__, **helpers, **names})  # the docs are ours
    except Exception as error:
        raise ValueError(
            f"{doc.relative_to(ROOT)}: {name}: {expr.strip()!r}: {type(error).__name__}: {error}"
        ) from error
    return value if isinstance(value, str) else str(value)


def results_link(doc: Path) -> str:
    """The relative link from a doc to results/."""
    return "results/" if doc.parent == ROOT else "../" * len(doc.parent.relative_to(ROOT).parts) + "results/"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render(text: str, doc: Path) -> str:
    """The doc with every marker's value rewritten from its results file."""

    def between(match: re.Match, value: str) -> str:  # the marker's text with `value` in place of its old one
        whole, start = match.group(0), match.start()
        return whole[: match.start("value") - start] + value + whole[match.end("value") - start :]

    text = TABLE.sub(lambda m: between(m, evaluate(m["file"], f"({m['expr']})", doc) + "\n"), text)
    return FIG.sub(lambda m: between(m, evaluate(m["file"], m["expr"], doc)), text)


# What a measured figure looks like in prose: a percentage, a duration, a memory size, a speed-up,
# a rate, or a signed decimal (a gain in points). Settings rarely take these forms; the few that do
# are named in tests/test_report.py.
MEASURED = re.compile(
    r"(?<![\w.])[+−-]?\d[\d,]*(\.\d+)?\s?(%|x\b|×(?!\s?\d)|s\b|ms\b|min\b|minutes?\b|seconds?\b|hours?\b"
    r"|h\b|GB\b|GiB\b|MB\b|MiB\b|tokens/s\b|GFLOP/s\b|points?\b)"
    r"|(?<![\w.])[+−]\d+\.\d+"
)
UNRENDERED = (
    re.compile(r"^(```|~~~).*?^(```|~~~)", re.S | re.M),  # code blocks: commands and examples
    TABLE,
    FIG,
    re.compile(r"<!--.*?-->", re.S),  # other comments
    re.compile(r"`[^`\n]*`"),  # inline code: flags and their values
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"<img[^>]*>"),
)


def unrendered_figures(text: str) -> list[tuple[int, str]]:
    """(line, figure) for every measured-looking figure that no marker renders."""
    for pattern in UNRENDERED:  # blank out, keeping the line count
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in MEASURED.finditer(text)]


def docs() -> list[Path]:
    """README.md and docs/*.md."""
    return sorted(path for pattern in DOCS for path in ROOT.glob(pattern))


def render_all(check: bool = False) -> list[Path]:
    """Render every doc; return the ones whose text changed (with check: would change, left as they are)."""
    load.cache_clear()
    changed = []
    for doc in docs():
        old = doc.read_text(encoding="utf-8")
        new = render(old, doc)
        if new != old:
            changed.append(doc)
            if not check:
                doc.write_text(new, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc differs from its files")
    args = parser.parse_args(argv)
    try:
        changed = render_all(check=args.check)
    except (ValueError, FileNotFoundError) as error:
        print(f"eval.report: {error}", file=sys.stderr)
        return 2
    for doc in changed:
        verb = "differs from its results files" if args.check else "rendered"
        print(f"{doc.relative_to(ROOT)}: {verb}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
