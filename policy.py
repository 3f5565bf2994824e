"""The policy: a tiny model built in code or a hub model, its device, and the supervised warm start.

Skip this file on a first reading. It gives train.py (and trl_treerl.py and eval/) a model and a
tokenizer to train:

- with no `--model`, a small Llama-architecture decoder and a character-level tokenizer built in
  code (nothing is downloaded), warm-started by a short supervised stage on worked solutions so
  that RL starts from a policy that is right some of the time (RL needs both correct and wrong
  leaves). `warm_started_policy` caches that stage in a folder, keyed by its settings;
- with `--model`, any causal LM that transformers can load (hub id or local folder).
"""

from __future__ import annotations

import json
import math
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

import tree
import treerl
from tasks import Task, TaskConfig, build_task
from treerl import arg


@dataclass
class PolicyConfig:
    """The model trained, and the supervised warm start of the tiny one."""

    model: str = arg("", "hub id or local path of a causal LM; empty: build the tiny CPU model in code")
    hidden_size: int = arg(128, "tiny model: hidden size")
    num_layers: int = arg(4, "tiny model: decoder layers")
    num_heads: int = arg(4, "tiny model: attention heads")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "parameter dtype")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "where the policy runs (auto: cuda if present)")
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the update")
    warmup_steps: int = arg(600, "supervised steps on worked solutions before RL (0: none)")
    warmup_batch_size: int = arg(48, "examples per supervised step")
    warmup_lr: float = arg(2e-3, "learning rate of the supervised stage")

    def validate(self) -> None:
        treerl.check_choices(self, PolicyConfig)
        for name in ("hidden_size", "num_layers", "num_heads", "warmup_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"--hidden_size ({self.hidden_size}) must be divisible by --num_heads ({self.num_heads})")


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, device
# --------------------------------------------------------------------------------------------------

# Every printable ASCII character and the newline, after three special tokens.
CHARACTERS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def build_char_tokenizer():
    """A character-level tokenizer built with `tokenizers` and wrapped for transformers, so that
    `save_pretrained` / `AutoTokenizer.from_pretrained` (and vLLM) treat it like any hub tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(cfg: PolicyConfig, tokenizer, seed: int = 0):
    """A small Llama-architecture decoder (about 0.9M parameters by default).

    Llama rather than Qwen2 only because of the tokenizer: for a `qwen2` checkpoint, AutoTokenizer
    loads Qwen2's own BPE tokenizer class, which would re-apply Qwen2's pre-tokenization to our
    character vocabulary (dropping spaces and newlines) when the run is reloaded. The two
    architectures differ only in Qwen2's attention biases.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=3 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pick_device(cfg: PolicyConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device(cfg.device)


def load_policy(path_or_id: str, cfg: PolicyConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


class GpuPeak:
    """Peak GPU memory allocated by torch, phase by phase: `read()` returns the peak (GB) since
    the last read (or since creation) and starts a new phase. Zero on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> float:
        if self.device is None:
            return 0.0
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


def progress_bar(iterable, **kwargs):
    """tqdm, refreshing less often when the output goes to a file rather than a terminal."""
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15, **kwargs)


# --------------------------------------------------------------------------------------------------
# Warm start: a short supervised stage on worked solutions
# --------------------------------------------------------------------------------------------------


def warm_start(model, tokenizer, task: Task, cfg: PolicyConfig, device, seed: int = 0) -> None:
    """Next-token cross-entropy on prompt + solution + EOS, the loss on the solution tokens only."""
    examples = [e for e in task.train if e.solution]
    if not examples:
        raise ValueError(
            f"--warmup_steps {cfg.warmup_steps}: task {task.name!r} has no worked solutions; use --warmup_steps 0"
        )
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)

    # Linear warm-up over the first 10% and cosine decay: stable and fast for a small model.
    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / max(cfg.warmup_steps // 10, 1)) * 0.5 * (1 + math.cos(math.pi * s / cfg.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    progress = progress_bar(range(cfg.warmup_steps), desc="warm start (supervised)")
    for _ in progress:
        batch = [rng.choice(examples) for _ in range(cfg.warmup_batch_size)]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
        solutions = [task.teacher(e, rng) if task.teacher else e.solution for e in batch]
        answers = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in solutions]
        sequences = [
            tree.TrainSequence(p, a, [0.0] * len(a), [1.0] * len(a), 1.0, True, None) for p, a in zip(prompts, answers)
        ]
        b = treerl.collate(sequences, tokenizer.pad_token_id, device=device)
        logp = b.logprobs(model)
        loss = -(logp * b.mask).sum() / b.mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


# The settings a cached warm start depends on (the held-out set, excluded from its data, is drawn
# from data_seed and eval_size).
WARM_START_FIELDS = (
    "seed",
    "data_seed",
    "hidden_size",
    "num_layers",
    "num_heads",
    "dtype",
    "arith_operands",
    "arith_digits",
    "eval_size",
    "warmup_steps",
    "warmup_batch_size",
    "warmup_lr",
    "warmup_slip_rate",
)


def warm_started_policy(
    cfg: PolicyConfig, task_cfg: TaskConfig, seed: int, warm_dir: Path, device, train_size: int | None = None
):
    """The tiny model and character tokenizer after the supervised warm start, and the task.

    The warm start runs once and is saved in `warm_dir` (save_pretrained, with its settings in
    recipe.json); a later call with the same settings loads it instead, one with other settings
    redoes it. Returns (model, tokenizer, task); `train_size` as for tasks.build_task.
    """
    settings = {**vars(cfg), **vars(task_cfg), "seed": seed}
    recipe = {name: settings[name] for name in WARM_START_FIELDS}
    recipe_file = Path(warm_dir) / "recipe.json"
    if cfg.warmup_steps > 0 and recipe_file.exists():
        if json.loads(recipe_file.read_text()) == recipe:
            print(f"warm start: reusing {warm_dir}", flush=True)
            model, tokenizer = load_policy(str(warm_dir), cfg, device)
            return model, tokenizer, build_task(task_cfg, tokenizer, train_size)
        print(f"warm start: settings differ from the cached one in {warm_dir}; redoing it", flush=True)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(cfg, tokenizer, seed).to(device)
    task = build_task(task_cfg, tokenizer, train_size)
    if cfg.warmup_steps > 0:
        warm_start(model, tokenizer, task, cfg, device, seed)
        Path(warm_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(warm_dir)
        tokenizer.save_pretrained(warm_dir)
        recipe_file.write_text(json.dumps(recipe, indent=2))
    return model, tokenizer, task
