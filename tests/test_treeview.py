"""Tests for treeview.py and eval/show_tree.py: the page and the text view of a forest."""

import re

import tree
import treeview
from tree import Node

EOS = 0


def decode(ids):
    """A stand-in tokenizer: token k is the letter k (1 = a), EOS is '$', 27 is '<'."""
    return "".join("$" if i == EOS else "<" if i == 27 else chr(96 + i) for i in ids)


def hand_forest():
    """The paper's figure: V(root) = 3/5; a = 'jk' has V = 1/2 and its child b has V = 1."""
    root = Node([1, 2])
    a = root.add([10, 11], logprobs=[-0.1, -0.2], entropies=[0.3, 0.4])
    b = a.add([12, 5, EOS], logprobs=[-1.5, -0.1, -0.1], finished=True)
    c = a.add([13, 27, EOS], logprobs=[-0.7, -0.1, -0.1], finished=True)
    d = root.add([20, 21], logprobs=[-0.2, -0.3])
    e = d.add([21, EOS], logprobs=[-0.9, -0.1], finished=True)
    f = d.add([22, EOS], logprobs=[-0.4, -0.1], finished=True)
    g = root.add([3, 3, 3])  # never ended
    for leaf, r in ((b, 1.0), (c, 0.0), (e, 1.0), (f, 1.0), (g, 0.0)):
        leaf.reward = r
    return root


def test_the_page_shows_every_segment_with_its_exact_values():
    root = hand_forest()
    page = treeview.render_html(root, decode)
    v, r = tree.values(root), tree.process_rewards(root)
    for node in tree.walk(root):
        if node is root:
            continue
        text = decode(node.tokens if node.parent is root else node.tokens[1:])
        assert text.replace("<", "&lt;") in page, text
        assert f'data-v="{v[node]!r}" data-r="{r[node]!r}"' in page
    assert page.count('data-verdict="correct"') == 3 and page.count('data-verdict="wrong"') == 1
    assert page.count('data-verdict="truncated"') == 1
    # The fork points: the first token of each segment below a fork, with its probability and the
    # fork score (-log p of the token first sampled there): b starts at 'l', p = exp(-1.5) = 0.22.
    assert "fork: &#x27;l&#x27; p=0.22, score 1.50" in page
    # A self-contained page: no links, scripts or remote resources.
    assert not re.search(r"https?://", page) and "<script" not in page and "src=" not in page


def test_the_text_view_is_the_same_forest():
    root = hand_forest()
    text = treeview.render_text(root, decode)
    lines = text.splitlines()
    assert lines[0] == "prompt 'ab'  V(root) = 0.600"
    assert len(lines) == 1 + sum(1 for node in tree.walk(root) if node is not root)
    r = tree.process_rewards(root)
    segments = [node for node in tree.walk(root) if node is not root]
    for line, node in zip(lines[1:], segments):
        depth = len(tree.ancestors(node)) - 1
        assert line.startswith("  " * depth + f"V={tree.values(root)[node]:.3f} R={r[node]:+.3f}")
        assert repr(decode(node.tokens)) in line
    assert "[truncated]" in lines[-1] and lines[2].count("[correct]") == 1


def test_show_tree_grows_a_forest_from_a_saved_policy(tmp_path, capsys):
    from eval import show_tree
    from policy import PolicyConfig, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    build_tiny_model(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "f.html"
    text = show_tree.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "Compute 1+2+3.",
            "--M",
            "2",
            "--N",
            "1",
            "--L",
            "1",
            "--T",
            "2",
            "--max_new_tokens",
            "12",
            "--out",
            str(out),
            "--eval_size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert out.exists() and "gold 6" in out.read_text()
    assert text.splitlines()[0].startswith("prompt 'Compute 1+2+3.\\n'") and text in capsys.readouterr().out
