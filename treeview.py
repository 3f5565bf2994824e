"""A picture of one EPTree forest: its segments, fork points, values and process rewards.

Skip this file on a first reading: it draws what tree.py computes, so that a reader can *see* a
forest the way the paper's figure shows one. `render_html` writes a self-contained page (inline
SVG, no scripts, no network) and `render_text` the same forest as indented text;
`python -m eval.show_tree` grows a forest with a policy and writes both, and train.py saves a page
for a fixed held-out prompt at every evaluation (`--save_trees`). `plot_metrics` draws the other
picture of a run, its training curves (metrics.png).

What each box shows, for a segment s (one run of tokens between two forks):
- its text, the first token marked when s starts at a fork point: the token EPTree re-sampled
  there, with its probability under the sampler and the fork score of the position;
- V(s), the mean correctness of the leaves under s; GA = V(s) - V(root) (Eq. 2);
  LA = V(s) - V(parent) (Eq. 3); R(s), the advantage every token of s is trained with (Eq. 4,
  with the re-weighting of the run's settings);
- for a leaf, the verdict: correct, wrong, or truncated (never ended).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tree
import treerl
from treerl import TreeConfig

BOX_WIDTH, CHARS_PER_LINE, LINE_HEIGHT, COLUMN_GAP, ROW_GAP = 300, 38, 15, 36, 12


@dataclass
class Segment:
    """What is drawn for one non-root node."""

    node: tree.Node
    depth: int
    text: str  # the segment's decoded tokens
    fork_token: str | None  # the first token, when the segment starts at a fork point
    fork_probability: float  # the sampler's probability of that token
    fork_score: float  # the fork score of the position (of the token first sampled there)
    V: float
    GA: float
    LA: float
    R: float


def describe(root: tree.Node, decode: Callable[[list[int]], str], cfg: TreeConfig | None = None) -> list[Segment]:
    """Every non-root segment of a scored forest, depth first, with its numbers.

    R(s) is computed with the run's settings `cfg` (default: the paper's), so it is what the run
    trained with; V, GA and LA are the paper's plain values (Eqs. 2 and 3)."""
    cfg = cfg or TreeConfig()
    v = tree.values(root)
    rewards = cfg.process_rewards(root)
    depth = {root: 0}
    segments = []
    for node in tree.walk(root):
        if node is root:
            continue
        depth[node] = depth[node.parent] + 1
        forked = node.parent is not root and bool(node.tokens)
        first = node.parent.children[0] if forked else None  # the continuation that was there first
        score = 0.0
        if first is not None and first.tokens:
            score = -first.logprobs[0] if cfg.fork_score == "nll" else first.entropies[0]
        segments.append(
            Segment(
                node=node,
                depth=depth[node],
                text=decode(node.tokens[1:] if forked else node.tokens),
                fork_token=decode(node.tokens[:1]) if forked else None,
                fork_probability=math.exp(node.logprobs[0]) if forked else 1.0,
                fork_score=score,
                V=v[node],
                GA=v[node] - v[root],
                LA=v[node] - v[node.parent],
                R=rewards[node],
            )
        )
    return segments


def verdict(node: tree.Node) -> str:
    if not node.is_leaf:
        return ""
    if not node.finished:
        return "truncated"
    return "correct" if (node.reward or 0) > 0 else "wrong"


def render_text(root: tree.Node, decode: Callable[[list[int]], str], cfg: TreeConfig | None = None) -> str:
    """The forest as indented text: one line per segment, its numbers, then its text."""
    lines = [f"prompt {decode(root.tokens)!r}  V(root) = {tree.values(root)[root]:.3f}"]
    for s in describe(root, decode, cfg):
        fork = (
            f" fork at {s.fork_token!r} (p={s.fork_probability:.2f}, score {s.fork_score:.2f})"
            if s.fork_token is not None
            else ""
        )
        mark = f" [{verdict(s.node)}]" if s.node.is_leaf else ""
        text = (s.fork_token or "") + s.text
        lines.append(f"{'  ' * s.depth}V={s.V:.3f} R={s.R:+.3f}{mark}{fork} {text!r}")
    return "\n".join(lines) + "\n"


def _wrap(text: str) -> list[str]:
    """Lines of at most CHARS_PER_LINE characters, newlines shown as ⏎ and kept as breaks."""
    lines = []
    for part in text.split("\n"):
        lines += [part[i : i + CHARS_PER_LINE] for i in range(0, max(len(part), 1), CHARS_PER_LINE)]
        lines[-1] += "⏎"
    lines[-1] = lines[-1][:-1]
    return lines


def _colour(r: float, scale: float) -> str:
    """Green for a positive R(s), red for a negative one, stronger the larger |R(s)|."""
    strength = min(abs(r) / scale, 1.0) if scale > 0 else 0.0
    hue = 130 if r >= 0 else 0
    return f"hsl({hue}, 60%, {97 - 35 * strength:.0f}%)"


def render_html(
    root: tree.Node, decode: Callable[[list[int]], str], title: str = "EPTree forest", cfg: TreeConfig | None = None
) -> str:
    """A self-contained HTML page: the forest drawn left to right, prompt at the root."""
    cfg = cfg or TreeConfig()
    segments = describe(root, decode, cfg)
    scale = max((abs(s.R) for s in segments), default=1.0)
    text_lines = {s.node: _wrap(s.text) for s in segments}
    heights = {s.node: (len(text_lines[s.node]) + 3) * LINE_HEIGHT + 8 for s in segments}
    # Leaves take rows top to bottom; a parent sits at the middle of its children's rows.
    y: dict[tree.Node, float] = {}
    cursor = 0.0
    for node in tree.walk(root):
        if node is not root and node.is_leaf:
            y[node] = cursor
            cursor += heights[node] + ROW_GAP
    for node in reversed(list(tree.walk(root))):
        if node is not root and not node.is_leaf:
            first, last = node.children[0], node.children[-1]
            y[node] = (y[first] + y[last] + heights[last] - heights[node]) / 2
    prompt_lines = _wrap(decode(root.tokens))
    top = (len(prompt_lines) + 2) * LINE_HEIGHT + 20
    depth = max((s.depth for s in segments), default=0)
    width = 20 + (depth + 1) * (BOX_WIDTH + COLUMN_GAP)
    height = top + max(cursor, 0) + 20
    v_root = tree.values(root)[root]

    def x_of(d: int) -> float:
        return 10 + d * (BOX_WIDTH + COLUMN_GAP)

    parts = [f'<text x="10" y="{LINE_HEIGHT}" class="head">prompt (root) · V(root) = {v_root:.3f}</text>']
    parts += [
        f'<text x="10" y="{(i + 2) * LINE_HEIGHT}" class="mono">{html.escape(line)}</text>'
        for i, line in enumerate(prompt_lines)
    ]
    for s in segments:
        x, top_y = x_of(s.depth - 1), top + y[s.node]
        if s.node.parent is not root:  # an edge from the parent's box
            px, py = x_of(s.depth - 2) + BOX_WIDTH, top + y[s.node.parent] + heights[s.node.parent] / 2
            parts.append(
                f'<path d="M{px:.0f},{py:.0f} C{px + COLUMN_GAP / 2:.0f},{py:.0f} '
                f'{x - COLUMN_GAP / 2:.0f},{top_y + 12:.0f} {x:.0f},{top_y + 12:.0f}" class="edge"/>'
            )
        mark = verdict(s.node)
        parts.append(f'<g data-v="{s.V!r}" data-r="{s.R!r}" data-verdict="{mark}">')
        parts.append(
            f'<rect x="{x}" y="{top_y}" width="{BOX_WIDTH}" height="{heights[s.node]}" rx="5" '
            f'fill="{_colour(s.R, scale)}" class="box {mark}"/>'
        )
        header = f"V={s.V:.2f}  GA={s.GA:+.2f}  LA={s.LA:+.2f}  R={s.R:+.3f}"
        parts.append(f'<text x="{x + 6}" y="{top_y + LINE_HEIGHT}" class="head">{html.escape(header)}</text>')
        if s.fork_token is not None:
            fork = f"fork: {s.fork_token!r} p={s.fork_probability:.2f}, score {s.fork_score:.2f}"
            parts.append(f'<text x="{x + 6}" y="{top_y + 2 * LINE_HEIGHT}" class="fork">{html.escape(fork)}</text>')
        for i, line in enumerate(text_lines[s.node]):
            parts.append(
                f'<text x="{x + 6}" y="{top_y + (i + 3) * LINE_HEIGHT}" class="mono">{html.escape(line)}</text>'
            )
        if mark:
            parts.append(
                f'<text x="{x + BOX_WIDTH - 6}" y="{top_y + LINE_HEIGHT}" class="verdict {mark}" '
                f'text-anchor="end">{"✓" if mark == "correct" else "✗" if mark == "wrong" else "…"} {mark}</text>'
            )
        parts.append("</g>")
    legend = (
        f"V(s): mean correctness of the leaves under s. GA = V(s) − V(root) (Eq. 2); LA = V(s) − "
        f"V(parent) (Eq. 3); R(s): the advantage of every token of s (Eq. 4: GA + LA, here with "
        f"reweight={cfg.reweight}). Colour: green for R &gt; 0, red for R &lt; 0, "
        f"stronger for larger |R|. A box that starts at a fork shows the re-sampled token, its "
        f"probability and the fork score ({cfg.fork_score}) of the position; ⏎ is a newline."
    )
    style = (
        "body{font-family:sans-serif;margin:16px} .mono{font-family:monospace;font-size:12px} "
        ".head{font-family:sans-serif;font-size:11px;font-weight:bold} .fork{font-family:monospace;"
        "font-size:11px;fill:#1f4fbf} .box{stroke:#555;stroke-width:1} .box.correct{stroke:#1a7f37;"
        "stroke-width:2.5} .box.wrong,.box.truncated{stroke:#b42318;stroke-width:2.5} .edge{fill:none;"
        "stroke:#888;stroke-width:1.2} .verdict{font-size:11px;font-weight:bold} .verdict.correct{fill:#1a7f37} "
        ".verdict.wrong,.verdict.truncated{fill:#b42318} p{max-width:900px;font-size:13px}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n<h3>{html.escape(title)}</h3>\n<p>{legend}</p>\n"
        f'<svg width="{width:.0f}" height="{height:.0f}" role="img">\n'
        + "\n".join(parts)
        + "\n</svg>\n</body></html>\n"
    )


def grow_forest(backend, tokenizer, task, example, cfg, seed: int = 0) -> tree.Node:
    """One forest for one problem, grown and scored as in training (treerl.rollout with the run's
    rollout settings `cfg`); its leaves carry their rewards."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers) if task.answer_markers else None
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    result = treerl.rollout(
        backend, [prompt], [example.gold], task.score, decode, cfg, seed=seed, answer_start=answer_start
    )
    return result.forests[0]


def plot_metrics(metrics_path: Path, out: Path, title: str = "") -> None:
    """Training curves: leaf reward, held-out accuracy, policy entropy and response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    panels = [
        ("reward", "mean leaf reward"),
        (("eval_sampled", "eval_greedy"), "held-out accuracy"),
        ("entropy", "mean token entropy"),
        ("response_length", "response length (tokens)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (keys, label) in zip(axes, panels):
        for key in keys if isinstance(keys, tuple) else (keys,):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                marker = "o" if key.startswith("eval") else None
                ax.plot(*zip(*points), marker=marker, ms=3, label=key.replace("eval_", ""))
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if isinstance(keys, tuple):
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
