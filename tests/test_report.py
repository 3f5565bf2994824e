"""eval/report.py: every measured figure in the docs is rendered from a results file, and the docs
on disk are what the renderer gives (the drift test, as `ruff format --check` is for code)."""

import json

import pytest

from eval import report

# Settings and facts written the way measurements are (a percentage, a size, a duration), which no
# results file holds because nothing was measured: each with what it is.
NOT_MEASURED = {
    "5% warm-up",  # the release's learning-rate warm-up, a setting
}


def test_docs_are_rendered_from_results():
    changed = report.render_all(check=True)
    assert not changed, f"run `python -m eval.report`: {', '.join(str(p.relative_to(report.ROOT)) for p in changed)}"


def test_every_measured_figure_is_rendered():
    found = []
    for doc in report.docs():
        text = doc.read_text(encoding="utf-8")
        for line, figure in report.unrendered_figures(text):
            context = text.splitlines()[line - 1]
            if not any(phrase in context for phrase in NOT_MEASURED):
                found.append(f"{doc.relative_to(report.ROOT)}:{line}: {figure!r} in {context.strip()[:100]!r}")
    assert not found, "figures typed by hand (wrap each in a fig marker):\n" + "\n".join(found)


def test_figure_listing_finds_figures_outside_markers():
    text = "It took 250 s and 0.80 GB, +15.5 points, 37.1% here, 1.98x there, 314 tokens/s.\n"
    assert [figure for _, figure in report.unrendered_figures(text)] == [
        "250 s",
        "0.80 GB",
        "+15.5 points",
        "37.1%",
        "1.98x",
        "314 tokens/s",
    ]
    hidden = "`--lr 3e-5`, <!-- fig a.json: 1 -->37.1%<!-- /fig --> and [a](x_5s.png)\n```\n90% in code\n```\n"
    assert report.unrendered_figures(hidden) == []


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """A copy of a repository with one doc and one results file, for the renderer to work on."""
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    payload = {"machine": "a CPU", "command": "python train.py", "rows": [{"seed": 0, "acc": 0.371, "s": 250.4}]}
    (tmp_path / "results" / "run" / "r.json").write_text(json.dumps(payload))
    monkeypatch.setattr(report, "ROOT", tmp_path)
    return tmp_path


DOC = """# Run

Accuracy <!-- fig run/r.json: pct(rows[0].acc) -->old<!-- /fig --> in all.

<!-- table run/r.json:
table(["seed", "wall"], [[r.seed, f"{r.s:.0f} s"] for r in rows])
-->
stale
<!-- /table -->
<!-- fig run/r.json: source() --><!-- /fig -->
"""


def test_render_writes_values_and_check_sees_drift(tree):
    doc = tree / "docs" / "run.md"
    doc.write_text(DOC)
    assert report.render_all(check=True) == [doc] and doc.read_text() == DOC  # check changes nothing
    assert report.render_all() == [doc]
    text = doc.read_text()
    assert "Accuracy <!-- fig run/r.json: pct(rows[0].acc) -->37.1%<!-- /fig --> in all." in text
    assert "| seed | wall |\n|---|---|\n| 0 | 250 s |\n<!-- /table -->" in text
    assert "[`results/run/r.json`](../results/run/r.json); machine: a CPU; command: `python train.py`." in text
    assert report.render_all(check=True) == []  # rendering twice gives the same text

    # A value changed in the results file changes the rendered doc.
    path = tree / "results" / "run" / "r.json"
    path.write_text(path.read_text().replace("0.371", "0.5"))
    assert report.render_all(check=True) == [doc]
    report.render_all()
    assert "-->50.0%<!-- /fig -->" in doc.read_text()


def test_a_bad_marker_names_the_doc_and_the_expression(tree):
    (tree / "docs" / "bad.md").write_text("<!-- fig run/r.json: rows[0].missing --><!-- /fig -->\n")
    with pytest.raises(ValueError, match=r"docs/bad.md: run/r.json: 'rows\[0\].missing': AttributeError"):
        report.render_all()
    (tree / "docs" / "bad.md").write_text("<!-- fig run/none.json: 1 --><!-- /fig -->\n")
    with pytest.raises(FileNotFoundError, match="none.json"):
        report.render_all()


def test_the_command_exits_nonzero_on_drift(tree, capsys):
    (tree / "README.md").write_text("<!-- fig run/r.json: num(rows[0].s) -->1<!-- /fig -->\n")
    assert report.main(["--check"]) == 1
    assert "README.md: differs" in capsys.readouterr().out
    assert report.main([]) == 0 and "-->250<!-- /fig -->" in (tree / "README.md").read_text()
    assert report.main(["--check"]) == 0


def test_every_results_file_names_its_commit():
    missing = [
        str(path.relative_to(report.ROOT))
        for path in sorted((report.ROOT / "results").rglob("*.json"))
        if "commit" not in json.loads(path.read_text())
    ]
    assert not missing, f"results files without the commit they ran from: {missing}"
