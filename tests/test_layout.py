"""The shape of the project that readers rely on: a short reading path in four files, imports that
run one way (from the run down to tree.py), and a README that stays a front door."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READING_PATH = ("tree.py", "treerl.py", "rewards.py", "train.py")
# The modules treerl.py sits above: the algorithm imports them (or they stand beside it), never the
# other way round.
BELOW_THE_ALGORITHM = ("tasks", "policy", "hf_backend", "vllm_backend", "packing")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def project_imports(module: str) -> dict[str, str]:
    """The project's modules that `module` (a dotted name) imports, directly or through other
    modules of the project, lazy imports included: each mapped to the module that imports it."""
    importer: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in imported_modules(ROOT / (current.replace(".", "/") + ".py")):
            if name not in importer and name != module and (ROOT / (name.replace(".", "/") + ".py")).is_file():
                importer[name] = current
                todo.append(name)
    return importer


@pytest.mark.parametrize("module", BELOW_THE_ALGORITHM)
def test_the_algorithm_sits_above_the_modules_it_drives(module):
    """No path in the import graph leads from these modules to treerl.py: the settings helpers, the
    log-prob helpers and the flat batch they share with it live below it (settings.py, logprobs.py)."""
    importer = project_imports(module)
    if "treerl" in importer:
        chain = ["treerl"]
        while chain[-1] != module:
            chain.append(importer[chain[-1]])
        pytest.fail(f"{module} reaches treerl: {' <- '.join(chain)}")
    assert importer, f"found no module of the project that {module} imports: the walk is broken"


def test_the_reading_path_is_at_most_2000_lines_of_formatted_code():
    """Counted after the formatter (ruff, pyproject.toml), so long lines cannot buy a short count."""
    paths = [str(ROOT / name) for name in READING_PATH]
    check = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *paths], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = {name: len((ROOT / name).read_text().splitlines()) for name in READING_PATH}
    assert sum(lines.values()) <= 2000, lines


def test_the_algorithm_knows_no_engine_and_no_verifier():
    assert imported_modules(ROOT / "tree.py") <= {
        "__future__",
        "math",
        "random",
        "dataclasses",
        "typing",
        "collections.abc",
    }
    treerl = imported_modules(ROOT / "treerl.py")
    assert not any(name.startswith(("transformers", "vllm")) for name in treerl), treerl
    assert not treerl & {"rewards", "packing", "hf_backend", "vllm_backend", "train", "tasks", "policy"}


@pytest.mark.parametrize(
    "path",
    [
        "trl_treerl.py",
        "eval/benchmarks.py",
        "eval/evaluate.py",
        "eval/common.py",
        "tree.py",
        "treerl.py",
        "rewards.py",
        "sandbox.py",
        "run_folder.py",
        "tasks.py",
        "policy.py",
        "packing.py",
        "hf_backend.py",
        "vllm_backend.py",
        "logprobs.py",
        "settings.py",
    ],
)
def test_train_is_an_entry_point_not_a_library(path):
    assert "train" not in imported_modules(ROOT / path)


def test_readme_is_a_front_door():
    """Short enough to read in a few minutes: about 2,000 words as a reader sees them (lines are not
    counted, so a long line saves nothing; HTML comments, such as the markers of rendered figures,
    are not shown)."""
    shown = re.sub(r"<!--.*?-->", " ", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(shown.split()) <= 2200


def test_nothing_outside_the_tests_refers_to_a_path_outside_the_repository():
    """Data, models and caches are named by the user (flags, environment variables) or live in the
    repository: a clone on another machine finds nothing at a sibling folder or an absolute path."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    outside = re.compile(r"\.\./shared|\.\./\.\./|/work/|/home/[a-z]|/root/")
    found = []
    for name in tracked:
        path = ROOT / name
        if name.startswith("tests/") or path.suffix not in {".py", ".md", ".yaml", ".txt", ".toml", ".cfg", ""}:
            continue
        if path.is_file():
            found += [f"{name}: {m.group(0)}" for m in outside.finditer(path.read_text(errors="replace"))]
    assert not found, found


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as hyphens
    (headings inside code blocks are not headings)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_reaches_its_file_and_heading():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists() or (
                anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text())
            ):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
