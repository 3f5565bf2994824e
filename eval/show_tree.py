"""See one EPTree forest grown by a policy: a self-contained HTML page and the same tree as text.

    python -m eval.show_tree --run runs/default [--index 0 | --prompt "Compute 4+7-2."] [--out FILE]
    python -m eval.show_tree --model runs/default/warmstart --M 4 --N 2 --L 1 --T 2 --seed 3

The policy is `--model` (a folder or hub id), or the latest checkpoint of `--run` (its warm start
when it has none). The run's settings (task, EPTree, rewards; its config.json) are the defaults,
and flags override them. The problem is held-out problem `--index` of the task, or `--prompt` with
`--gold` (for the arithmetic task the gold is worked out when not given; the other tasks put
`--prompt` through the model's chat template). The forest is grown and
scored as in training (treerl.rollout) and drawn by treeview.py; the text goes to the terminal,
the page to `--out` (default: trees/forest.html in the run folder, or ./forest.html).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import policy
import tasks
import treeview
from hf_backend import HFBackend
from treerl import RolloutConfig


@dataclass
class ShowArgs:
    run: str = field(default="", metadata={"help": "a train.py run folder: its latest checkpoint and its settings"})
    model: str = field(default="", metadata={"help": "policy folder or hub id (default: from --run)"})
    index: int = field(default=0, metadata={"help": "held-out problem of the task to grow the forest for"})
    prompt: str = field(default="", metadata={"help": "a problem of your own instead of --index (a newline is added)"})
    gold: str = field(default="", metadata={"help": "the gold answer of --prompt (arith: worked out when empty)"})
    seed: int = field(default=0, metadata={"help": "sampling seed of the search"})
    out: str = field(default="", metadata={"help": "HTML file to write"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def policy_folder(run: Path) -> Path:
    checkpoints = sorted((run / "checkpoints").glob("step-??????"))
    if checkpoints:
        return checkpoints[-1]
    if (run / "warmstart" / "config.json").exists():
        return run / "warmstart"
    raise SystemExit(f"show_tree: {run} has neither a checkpoint nor a warm start; give --model")


def question(tokenizer, prompt: str) -> str:
    """The user's message of a chat-template prompt (the template around it removed), else the prompt."""
    if getattr(tokenizer, "chat_template", None):
        before, after = tasks.chat_prompt(tokenizer, "\0").split("\0")
        if prompt.startswith(before) and prompt.endswith(after):
            return prompt[len(before) : len(prompt) - len(after)]
    return prompt.strip()


def main(argv: list[str] | None = None) -> str:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--run", default="")
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser((ShowArgs, tasks.TaskConfig, RolloutConfig), description=__doc__.split("\n\n")[0])
    if known.run:
        config = Path(known.run) / "config.json"
        if not config.exists():
            parser.error(f"--run {known.run}: no config.json there (is it a train.py run folder?)")
        settings = json.loads(config.read_text())
        ours = {f.name for cls in (tasks.TaskConfig, RolloutConfig) for f in fields(cls)}
        parser.set_defaults(**{k: v for k, v in settings.items() if k in ours})
    args, task_cfg, rollout_cfg = parser.parse_args_into_dataclasses(argv)
    if not (args.run or args.model):
        parser.error("give --run (a train.py run folder) or --model")
    task_cfg.validate()
    rollout_cfg.validate()

    device = policy.pick_device(policy.PolicyConfig(device=args.device))
    folder = args.model or str(policy_folder(Path(args.run)))
    model, tokenizer = policy.load_policy(folder, policy.PolicyConfig(device=args.device), device)
    task = tasks.build_task(task_cfg, tokenizer, train_size=1)
    if args.prompt:
        prompt = args.prompt if args.prompt.endswith("\n") else args.prompt + "\n"
        if task.name != "arith":  # the other tasks ask through the chat template, when there is one
            prompt = tasks.chat_prompt(tokenizer, args.prompt)
        gold = args.gold
        if not gold and task.name == "arith":
            gold = tasks.arith_teacher_solution(prompt, random.Random(0), 0.0).rsplit("Answer: ", 1)[1]
        if not gold:
            parser.error("--prompt needs --gold for this task")
        example = tasks.Example(prompt, gold)
    else:
        if not 0 <= args.index < len(task.eval):
            parser.error(f"--index must be in [0, {len(task.eval)}); the task has {len(task.eval)} held-out problems")
        example = task.eval[args.index]

    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    root = treeview.grow_forest(backend, tokenizer, task, example, rollout_cfg, seed=args.seed)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = treeview.render_text(root, decode, rollout_cfg)
    title = f"{Path(folder).name}: {question(tokenizer, example.prompt)} (gold {example.gold})"
    page = treeview.render_html(root, decode, title, rollout_cfg)
    out = Path(args.out or (Path(args.run) / "trees" / "forest.html" if args.run else "forest.html"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(text, end="")
    print(f"page: {out}")
    return text


if __name__ == "__main__":
    main()
