"""Train a language model with TreeRL (or the ChainRL baseline): `python train.py`.

With no arguments this runs the CPU default end to end, in minutes, with nothing downloaded:

1. build a small Llama-architecture model and a character-level tokenizer in code;
2. warm-start it with a short supervised stage on worked arithmetic solutions, so that RL starts
   from a policy that is right some of the time (RL needs both correct and wrong leaves);
3. run TreeRL: EPTree rollouts, process rewards, clipped policy-gradient updates;
4. report held-out accuracy before and after RL and write `runs/<run_name>/summary.json`,
   `metrics.jsonl` and `metrics.png`.

Every setting is a flag (`python train.py --help`); `--config configs/<preset>.yaml` loads a preset,
and flags given after it override it. `--algo chainrl` trains the baseline on the same budget of
prompts. `--model <hub id or path>` with `--task math --data FILE.jsonl` trains a real model (see
configs/ and README for the single-GPU presets).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import rewards
import treerl
from treerl import RolloutConfig, UpdateConfig

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Everything about a run that is not the rollout or the update."""

    run_name: str = field(default="default", metadata={"help": "results go to <output_dir>/<run_name>/"})
    output_dir: str = field(default="runs", metadata={"help": "parent folder of all runs"})
    seed: int = field(default=0, metadata={"help": "seed of model init, data order and sampling"})
    data_seed: int = field(default=0, metadata={"help": "arith: seed of the problem sets (held-out and training pool), kept fixed across --seed so every seed is scored on the same held-out problems"})
    # The policy.
    model: str = field(default="", metadata={"help": "hub id or local path of a causal LM; empty: build the tiny CPU model in code"})
    hidden_size: int = field(default=128, metadata={"help": "tiny model: hidden size"})
    num_layers: int = field(default=4, metadata={"help": "tiny model: decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "tiny model: attention heads"})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory in the update"})
    backend: str = field(default="hf", metadata={"help": "rollout engine: hf (a KV-cache decode loop over the transformers model) or vllm (colocated vLLM engine, needs `pip install vllm`)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vllm: share of the GPU the engine may take (weights, activations, KV cache); the trainer has the rest"})
    vllm_kv_cache_gb: float = field(default=0.0, metadata={"help": "vllm: KV cache size in GiB (0: from vllm_gpu_memory_utilization on a GPU, 0.25 on CPU)"})
    vllm_sleep: bool = field(default=True, metadata={"help": "vllm on a GPU: free the engine's weights and KV cache during the update (they come back at sync)"})
    gen_batch_size: int = field(default=256, metadata={"help": "sequences per generation batch (hf backend)"})
    # The task.
    task: str = field(default="arith", metadata={"help": "arith (built in), math or code"})
    data: str = field(default="", metadata={"help": "math/code: training JSONL file (or hub dataset id with `datasets` installed)"})
    eval_data: str = field(default="", metadata={"help": "math/code: held-out JSONL file (default: the last eval_size rows of --data)"})
    problem_field: str = field(default="problem", metadata={"help": "field holding the question"})
    answer_field: str = field(default="answer", metadata={"help": "math: field holding the gold answer"})
    tests_field: str = field(default="tests", metadata={"help": "code: field holding the tests"})
    arith_operands: str = field(default="3,4", metadata={"help": "arith: min,max number of operands"})
    arith_digits: int = field(default=1, metadata={"help": "arith: digits per operand"})
    eval_size: int = field(default=200, metadata={"help": "held-out problems (never used for training)"})
    eval_samples: int = field(default=4, metadata={"help": "sampled responses per held-out problem for avg@k"})
    # Warm start (supervised), for the built-in task.
    warmup_steps: int = field(default=600, metadata={"help": "supervised steps on worked solutions before RL (0: none)"})
    warmup_batch_size: int = field(default=64, metadata={"help": "examples per supervised step"})
    warmup_lr: float = field(default=2e-3, metadata={"help": "learning rate of the supervised stage"})
    warmup_slip_rate: float = field(default=0.2, metadata={"help": "arith: probability that the warm start's teacher slips on a step (result off by 1-2)"})
    # RL.
    steps: int = field(default=120, metadata={"help": "RL steps"})
    max_generated_tokens: int = field(default=0, metadata={"help": "stop RL once this many tokens have been generated (0: no limit); compares methods at equal generation cost"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per RL step (each grows a forest)"})
    eval_every: int = field(default=20, metadata={"help": "held-out evaluation every this many steps (0: only before and after)"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every this many steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint of this run"})

    def validate(self) -> None:
        allowed = {"task": ("arith", "math", "code"), "dtype": ("float32", "bfloat16"),
                   "device": ("auto", "cpu", "cuda"), "backend": ("hf", "vllm")}
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.task != "arith" and not self.data:
            raise ValueError(f"--task {self.task} needs --data (a JSONL file or hub dataset id)")
        for name in ("prompts_per_step", "eval_size", "eval_samples", "gen_batch_size",
                     "warmup_batch_size", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "eval_every", "save_every", "max_generated_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1]; got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gb < 0:
            raise ValueError(f"--vllm_kv_cache_gb must be >= 0; got {self.vllm_kv_cache_gb}")
        if not 0.0 <= self.warmup_slip_rate < 1.0:
            raise ValueError(f"--warmup_slip_rate must be in [0, 1); got {self.warmup_slip_rate}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"--hidden_size ({self.hidden_size}) must be divisible by --num_heads ({self.num_heads})")
        self.operand_range()

    def operand_range(self) -> tuple[int, int]:
        try:
            low, high = (int(x) for x in self.arith_operands.split(","))
        except ValueError:
            raise ValueError(f"--arith_operands must be two integers 'min,max'; got {self.arith_operands!r}") from None
        if not 2 <= low <= high:
            raise ValueError(f"--arith_operands needs 2 <= min <= max; got {self.arith_operands!r}")
        return low, high


CONFIG_CLASSES = (RunConfig, RolloutConfig, UpdateConfig)
# The settings a cached warm start depends on (the held-out set is drawn from seed and eval_size).
WARM_START_FIELDS = ("seed", "data_seed", "hidden_size", "num_layers", "num_heads", "dtype", "arith_operands",
                     "arith_digits", "eval_size", "warmup_steps", "warmup_batch_size", "warmup_lr",
                     "warmup_slip_rate")


@dataclass
class Config:
    run: RunConfig
    rollout: RolloutConfig
    update: UpdateConfig

    def as_dict(self) -> dict:
        return {**asdict(self.run), **asdict(self.rollout), **asdict(self.update)}


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags from the three dataclasses (transformers' HfArgumentParser); `--config FILE.yaml`
    supplies defaults that flags given on the command line override."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(CONFIG_CLASSES, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="YAML preset (flags after it override it)")
    if known.config:
        parser.set_defaults(**load_preset(known.config))
    run, rollout, update = parser.parse_args_into_dataclasses(args=rest)[:3]
    config = Config(run, rollout, update)
    for part in (run, rollout, update):
        part.validate()
    return config


def load_preset(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"--config: no such file {path!r}")
    with open(path) as f:
        preset = yaml.safe_load(f) or {}
    if not isinstance(preset, dict):
        raise ValueError(f"{path}: a preset is a mapping of flag names to values")
    known = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (see python train.py --help)")
    return preset


# --------------------------------------------------------------------------------------------------
# Model and tokenizer
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
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_tiny_model(cfg: RunConfig, tokenizer):
    """A small Llama-architecture decoder (about 0.9M parameters by default).

    Llama rather than Qwen2 only because of the tokenizer: for a `qwen2` checkpoint, AutoTokenizer
    loads Qwen2's own BPE tokenizer class, which would re-apply Qwen2's pre-tokenization to our
    character vocabulary (dropping spaces and newlines) when the run is reloaded. The two
    architectures differ only in Qwen2's attention biases.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=3 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


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


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return torch.device(cfg.device)


def load_policy(path_or_id: str, cfg: RunConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


# --------------------------------------------------------------------------------------------------
# Tasks and data
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: str
    gold: object                  # the gold answer (math, arith) or the tests (code)
    solution: str | None = None   # a worked solution, for the warm start


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    score: Callable[[list[str], list], list[float]]   # batch verifier: responses, golds -> rewards
    answer_markers: tuple[str, ...]
    # Worked solution for the warm start, drawn afresh each time (a noisy teacher); None: e.solution.
    teacher: Callable[[Example, random.Random], str] | None = None


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_task(cfg: RunConfig, tokenizer) -> Task:
    if cfg.task == "arith":
        return arith_task(cfg)
    rows = load_rows(cfg.data)
    held_out = load_rows(cfg.eval_data) if cfg.eval_data else rows[-cfg.eval_size:]
    if not cfg.eval_data:
        rows = rows[:-cfg.eval_size]
    if cfg.task == "math":
        make = lambda row: Example(chat_prompt(tokenizer, f"{row[cfg.problem_field]}\n{MATH_INSTRUCTION}"),  # noqa: E731
                                   str(row[cfg.answer_field]))
        needed, score, markers = (cfg.problem_field, cfg.answer_field), rewards.math_rewards, ("\\boxed{",)
    else:
        make = lambda row: Example(chat_prompt(tokenizer, row[cfg.problem_field]), row[cfg.tests_field])  # noqa: E731
        needed, score, markers = (cfg.problem_field, cfg.tests_field), code_rewards, ()
    source = cfg.eval_data or cfg.data
    for where, part in ((cfg.data, rows), (source, held_out)):
        for line, row in part:
            missing = [k for k in needed if k not in row]
            if missing:
                raise ValueError(f"{where}:{line}: row has no field {missing[0]!r} "
                                 f"(rename with --problem_field/--answer_field/--tests_field)")
    if not rows:
        raise ValueError(f"{cfg.data}: no training rows left after holding out {cfg.eval_size}")
    return Task(cfg.task, [make(r) for _, r in rows], [make(r) for _, r in held_out], score, markers)


def load_rows(source: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a JSONL file (optionally gzipped) or a hub dataset id."""
    path = Path(source)
    if not path.exists():
        if source.endswith((".jsonl", ".json", ".gz")):
            raise ValueError(f"no such data file: {source}")
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{source!r} is not a file, and loading a hub dataset needs `pip install datasets`") from None
        return [(i + 1, dict(row)) for i, row in enumerate(datasets.load_dataset(source, split="train"))]
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{line_number}: expected a JSON object")
            rows.append((line_number, row))
    return rows


def chat_prompt(tokenizer, text: str) -> str:
    """The tokenizer's chat template when it has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


def code_rewards(responses: list[str], tests: list) -> list[float]:
    """Run every program in the sandbox, two at a time (each run is its own process)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda r, t: rewards.code_reward(rewards.extract_program(r), t),
                             responses, tests))


def arith_task(cfg: RunConfig) -> Task:
    """The built-in task: multi-step integer arithmetic with a worked chain of steps. The held-out
    set is drawn first and excluded from everything the model trains on."""
    operands = cfg.operand_range()
    held_out = rewards.arith_dataset(cfg.eval_size, seed=10_000 + cfg.data_seed, n_operands=operands,
                                     digits=cfg.arith_digits)
    exclude = {p.prompt for p in held_out}
    pool_size = max(cfg.warmup_steps * cfg.warmup_batch_size, cfg.steps * cfg.prompts_per_step, 1)
    pool_size = min(pool_size, 50_000)
    train = rewards.arith_dataset(pool_size, seed=cfg.data_seed, n_operands=operands,
                                  digits=cfg.arith_digits, exclude=exclude)
    as_example = lambda p: Example(p.prompt, p.answer, p.solution)  # noqa: E731
    score = lambda responses, golds: [rewards.arith_reward(r, g) for r, g in zip(responses, golds)]  # noqa: E731
    teacher = None
    if cfg.warmup_slip_rate > 0:
        teacher = lambda e, rng: rewards.arith_teacher_solution(e.prompt, rng, cfg.warmup_slip_rate)  # noqa: E731
    return Task("arith", [as_example(p) for p in train], [as_example(p) for p in held_out], score,
                rewards.ANSWER_MARKERS, teacher)


def progress_bar(iterable, **kwargs):
    """tqdm, refreshing less often when the output goes to a file rather than a terminal."""
    return tqdm(iterable, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15, **kwargs)


# --------------------------------------------------------------------------------------------------
# Warm start: a short supervised stage on worked solutions
# --------------------------------------------------------------------------------------------------


def warm_start(model, tokenizer, task: Task, cfg: RunConfig, device) -> None:
    """Next-token cross-entropy on prompt + solution + EOS, the loss on the solution tokens only."""
    examples = [e for e in task.train if e.solution]
    if not examples:
        raise ValueError(f"--warmup_steps {cfg.warmup_steps}: task {task.name!r} has no worked solutions; use --warmup_steps 0")
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    # Linear warm-up over the first 10% and cosine decay: stable and fast for a small model.
    schedule = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps // 10, 1)) * 0.5 * (1 + math.cos(math.pi * s / cfg.warmup_steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    progress = progress_bar(range(cfg.warmup_steps), desc="warm start (supervised)")
    for _ in progress:
        batch = [rng.choice(examples) for _ in range(cfg.warmup_batch_size)]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
        solutions = [task.teacher(e, rng) if task.teacher else e.solution for e in batch]
        answers = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for s in solutions]
        sequences = [treerl.tree.TrainSequence(p, a, [0.0] * len(a), [1.0] * len(a), 1.0, True, None)
                     for p, a in zip(prompts, answers)]
        b = treerl.collate(sequences, tokenizer.pad_token_id, device)
        logp = treerl.sequence_logprobs(model, b)
        loss = -(logp * b.mask).sum() / b.mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


# --------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(backend, tokenizer, task: Task, cfg: Config, seed: int) -> dict[str, float]:
    """Held-out accuracy: greedy (one response per problem) and avg@k over k sampled responses at
    the training temperature (the mean accuracy, the metric RL directly optimises)."""
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval]
    golds = [e.gold for e in task.eval]
    result = {}
    for name, temperature, k in (("greedy", 0.0, 1), ("sampled", cfg.rollout.temperature, cfg.run.eval_samples)):
        torch.manual_seed(seed)
        groups = backend.sample(prompts, k, cfg.rollout.max_new_tokens, temperature, cfg.rollout.top_p)
        texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for g in groups for s in g]
        verdicts = task.score(texts, [gold for gold in golds for _ in range(k)])
        finished = [s.finished for g in groups for s in g]
        result[name] = sum(v * f for v, f in zip(verdicts, finished)) / len(verdicts)
    return result


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict) -> None:
    """Model and tokenizer (save_pretrained), optimizer, scheduler, RNG states and step, written to a
    temporary folder and renamed into place: a run killed mid-write never leaves a half checkpoint."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({
        "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        **extra,
    }, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((run_dir / "checkpoints").glob("step-??????"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-??????"))
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def make_backend(run: RunConfig, model, tokenizer):
    """The rollout engine named by --backend (vLLM is imported only when chosen)."""
    if run.backend == "vllm":
        return treerl.VLLMBackend(model, tokenizer.eos_token_id, run.vllm_gpu_memory_utilization,
                                  run.vllm_kv_cache_gb, sleep=run.vllm_sleep, seed=run.seed)
    return treerl.HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, run.gen_batch_size)


def train(config: Config) -> dict:
    run, rcfg, ucfg = config.run, config.rollout, config.update
    if run.backend == "vllm" and importlib.util.find_spec("vllm") is None:  # say so before the warm start
        raise SystemExit("train.py: error: --backend vllm needs vLLM: pip install -r requirements-gpu.txt "
                         "(GPU) or requirements-cpu-vllm.txt (CPU), see README")
    started = time.perf_counter()
    run_dir = Path(run.output_dir) / run.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.as_dict(), indent=2))
    print("config:", json.dumps(config.as_dict()), flush=True)
    device = pick_device(run)
    random.seed(run.seed)
    torch.manual_seed(run.seed)

    checkpoint = latest_checkpoint(run_dir) if run.resume else None
    if run.resume and checkpoint is None:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
    warm_dir = run_dir / "warmstart"
    # The supervised stage runs once per run directory; later runs (and --resume) reuse it, as
    # long as the settings it was made with are unchanged.
    recipe = {name: getattr(run, name) for name in WARM_START_FIELDS}
    recipe_file = warm_dir / "recipe.json"
    warm_cached = (run.warmup_steps > 0 and not run.model and recipe_file.exists()
                   and json.loads(recipe_file.read_text()) == recipe)
    if recipe_file.exists() and not warm_cached and run.warmup_steps > 0 and not run.model:
        print(f"warm start: settings differ from the cached one in {warm_dir}; redoing it", flush=True)
    state = {}
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
        model, tokenizer = load_policy(str(checkpoint), run, device)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    elif run.model:
        model, tokenizer = load_policy(run.model, run, device)
    elif warm_cached:
        print(f"warm start: reusing {warm_dir}", flush=True)
        model, tokenizer = load_policy(str(warm_dir), run, device)
    else:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(run, tokenizer).to(device)
    task = build_task(run, tokenizer)
    print(f"task {task.name}: {len(task.train)} training problems, {len(task.eval)} held out; "
          f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    if checkpoint is None and not run.model and run.warmup_steps > 0 and not warm_cached:
        warm_start(model, tokenizer, task, run, device)
        model.save_pretrained(warm_dir)
        tokenizer.save_pretrained(warm_dir)
        recipe_file.write_text(json.dumps(recipe, indent=2))

    backend = make_backend(run, model, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers) if task.answer_markers else None
    # The KL reference is the policy RL started from (the hub model or the warm start), also when
    # resuming: never the latest checkpoint.
    ref_model = None
    if ucfg.kl_coef > 0:
        if run.model or (warm_dir / "config.json").exists():
            ref_model = type(model).from_pretrained(run.model or str(warm_dir), dtype=getattr(torch, run.dtype))
        else:  # an untrained tiny model (--warmup_steps 0): rebuilt from the same seed
            ref_model = build_tiny_model(run, tokenizer)
        ref_model = ref_model.to(device).eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=ucfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # constant, as in the release
    metrics_path = run_dir / "metrics.jsonl"
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step, before = state["step"], state["accuracy_before"]
        generated, elapsed_before = state["generated_tokens"], state["wall_seconds"]
        # Drop metrics logged after the checkpoint: the resumed run logs them again.
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    else:
        before = evaluate(backend, tokenizer, task, config, seed=run.seed)
        print(f"held-out accuracy before RL: greedy {before['greedy']:.1%}, "
              f"avg@{run.eval_samples} {before['sampled']:.1%}", flush=True)
        start_step, generated, elapsed_before = 0, 0, 0.0
        metrics_path.write_text(json.dumps({"step": 0, "eval_greedy": before["greedy"],
                                            "eval_sampled": before["sampled"], "generated_tokens": 0}) + "\n")
    resumed_at = time.perf_counter()

    budget_spent = run.max_generated_tokens and generated >= run.max_generated_tokens
    last_step = start_step if budget_spent else run.steps
    progress = progress_bar(range(start_step + 1, last_step + 1), desc=f"RL ({rcfg.algo})",
                            initial=start_step, total=run.steps)
    after = before
    for step in progress:
        # Each step's prompts and sampling noise depend only on (seed, step): resume-safe.
        torch.manual_seed(run.seed * 1_000_003 + step)
        picked = random.Random(run.seed * 1_000_003 + step).sample(range(len(task.train)), run.prompts_per_step)
        examples = [task.train[i] for i in picked]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
        gpu_peak = GpuPeak(device)
        result = treerl.rollout(backend, prompts, [e.gold for e in examples], task.score, decode,
                                rcfg, seed=run.seed * 1_000_003 + step, answer_start=answer_start)
        rollout_peak = gpu_peak.read()
        t0 = time.perf_counter()
        stats = {}
        if hasattr(backend, "sleep"):  # vLLM on a GPU: hand the engine's memory to the update
            backend.sleep()
        if result.sequences:
            stats = treerl.update(model, optimizer, scheduler, result.sequences, ucfg,
                                  tokenizer.pad_token_id, rcfg.temperature, ref_model, seed=step)
        t1 = time.perf_counter()
        update_peak = gpu_peak.read()
        backend.sync(model)
        generated += result.stats["generated_tokens"]
        last = step == run.steps or (run.max_generated_tokens and generated >= run.max_generated_tokens)
        row = {"step": step, **result.stats, **stats, "sequences": len(result.sequences),
               "time_update": t1 - t0, "time_sync": time.perf_counter() - t1,
               "generated_tokens_total": generated}
        if device.type == "cuda":
            row.update(gpu_peak_rollout_gb=rollout_peak, gpu_peak_update_gb=update_peak)
        if (run.eval_every and step % run.eval_every == 0) or last:
            after = evaluate(backend, tokenizer, task, config, seed=run.seed)
            row.update(eval_greedy=after["greedy"], eval_sampled=after["sampled"])
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        progress.set_postfix(reward=f"{result.stats['reward']:.2f}", eval=f"{after['sampled']:.2f}", refresh=False)
        if (run.save_every and step % run.save_every == 0) or last:
            save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, {
                "accuracy_before": before, "generated_tokens": generated,
                "wall_seconds": elapsed_before + time.perf_counter() - resumed_at})
        if last:
            break
    progress.close()

    wall = elapsed_before + (time.perf_counter() - (resumed_at if checkpoint is not None else started))
    summary = {
        "accuracy_before": before["sampled"], "accuracy_after": after["sampled"],
        "greedy_accuracy_before": before["greedy"], "greedy_accuracy_after": after["greedy"],
        "accuracy_metric": f"held-out avg@{run.eval_samples} at temperature {rcfg.temperature}",
        "generated_tokens": generated, "wall_seconds": wall,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": config.as_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hasattr(backend, "close"):  # vLLM: shut the engine down and free its memory
        backend.close()
    plot_metrics(metrics_path, run_dir / "metrics.png", title=f"{rcfg.algo} - {run.run_name}")
    print(f"held-out accuracy (avg@{run.eval_samples}): {before['sampled']:.1%} -> {after['sampled']:.1%}; "
          f"greedy: {before['greedy']:.1%} -> {after['greedy']:.1%}; {wall:.0f} s; "
          f"peak memory {summary['peak_memory_mb']:.0f} MB; results in {run_dir}", flush=True)
    return summary


def plot_metrics(metrics_path: Path, out: Path, title: str = "") -> None:
    """Training curves: leaf reward, held-out accuracy, policy entropy and response length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    panels = [("reward", "mean leaf reward"), (("eval_sampled", "eval_greedy"), "held-out accuracy"),
              ("entropy", "mean token entropy"), ("response_length", "response length (tokens)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (keys, label) in zip(axes, panels):
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, ms=3,
                        label=key.replace("eval_", ""))
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if isinstance(keys, tuple):
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    try:
        config = parse_config(argv)
    except ValueError as error:
        sys.exit(f"train.py: error: {error}")
    return train(config)


if __name__ == "__main__":
    main()
