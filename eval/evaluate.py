"""Benchmark a model: sample k responses per problem, grade them, report avg@k and pass@k.

    python -m eval.evaluate --model PATH_OR_HUB_ID --bench math500 --samples 16
    python -m eval.evaluate --model runs/default/checkpoints/step-000120 --bench math500,aime24,humaneval
    python -m eval.evaluate --model M --bench mine --bench_file mine=my_problems.jsonl

The paper compares TreeRL with ChainRL on math benchmarks by the accuracy of sampled responses;
this is the harness for such comparisons. For every problem it samples `--samples` (= k) responses
and grades each with the verifiers of `rewards.py` (see `eval/benchmarks.py` for the benchmarks, their
prompts and their grading). Two metrics, per benchmark:

* **avg@k**: the mean correctness over all k samples of all problems, the expected accuracy of one
  sampled response (what RL directly optimises; the paper's headline number on most benchmarks);
* **pass@k**: the probability that at least one of k samples is correct, with the unbiased estimator
  of Chen et al. (2021, the Codex paper): from n samples per problem of which c are correct,
  pass@k = 1 - C(n-c, k) / C(n, k), reported for k = 1, 2, 4, ... up to n, and n itself.
  (pass@1 equals avg@n: both are c / n averaged over problems.)

Generation is a *responder*: a function from prompt texts and a count n to n `Generation`s per
prompt. `make_responder` is the one place a backend is chosen (`--backend hf`: the transformers
decode loop that also samples in training; `--backend vllm`: the vLLM engine); tests swap in an
"oracle" responder that answers with the gold solution, which checks extraction and verification
end to end with no model at all.

The benchmark files are read from the folder `--data_dir` (or the environment variable
`TREERL_DATA`) names; with neither, each bench is read from its public copy on the Hugging Face hub
at a pinned commit (`benchmarks.HUB`), and without a network the error lists the files to get
(docs/evaluation.md, "Getting the benchmark data").

An interrupted evaluation resumes: every batch of responses is kept in `<out>/progress/` as it
comes, and the same command run again samples only what is missing (the folder goes once the
outputs are written).

Writes to `--out` (default `results/eval/<model name>`): `samples.jsonl` (one row per sampled
response: bench, index, prompt, response, extracted answer, gold, correct, ...), `summary.json`
(per bench: n, samples, avg@k, pass@k, response length, truncation, the sampling settings) and
`summary.md` (the table that is also printed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sandbox
from eval import benchmarks
from eval.benchmarks import Problem
from eval.common import markdown_table

# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The binomials overflow floats for large n, so the ratio is computed as a product
    (Chen et al., 2021):  C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k / i).
    When fewer than k samples are wrong (n - c < k), every draw of k contains a correct one: 1.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (the samples per problem), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(samples: int) -> list[int]:
    """The k of the report: powers of two up to `samples`, and `samples` itself (16 -> 1,2,4,8,16;
    6 -> 1,2,4,6)."""
    if samples < 1:
        raise ValueError(f"--samples (k) must be >= 1, got {samples}")
    ks = [2**p for p in range(samples.bit_length()) if 2**p <= samples]
    return ks if ks[-1] == samples else ks + [samples]


def bench_metrics(correct: list[list[float]]) -> dict[str, float]:
    """avg@k and pass@k for every reported k, from each problem's per-sample correctness (0/1)."""
    if not correct:
        raise ValueError("no problems to score")
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError("every problem needs the same number of samples")
    counts = [sum(1 for value in row if value >= 0.5) for row in correct]
    metrics = {f"avg@{n}": sum(sum(row) / n for row in correct) / len(correct)}
    for k in k_values(n):
        metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return metrics


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

BACKENDS = ("hf", "vllm")  # chosen in make_responder


@dataclass
class EvalConfig:
    """Every setting is a flag: `python -m eval.evaluate --help`."""

    model: str = field(
        default="", metadata={"help": "hub id, save_pretrained folder, GGUF file or packaged model (smollm2-135m)"}
    )
    bench: str = field(
        default="math500", metadata={"help": "comma-separated: " + ",".join(benchmarks.BENCHES) + ", or all"}
    )
    samples: int = field(default=1, metadata={"help": "k: sampled responses per problem"})
    data_dir: str = field(
        default="",
        metadata={
            "help": "folder with the benchmark files (default: $TREERL_DATA; with neither, the pinned "
            "Hugging Face hub copies; docs/evaluation.md, 'Getting the benchmark data')"
        },
    )
    bench_file: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NAME=FILE.jsonl or NAME=org/dataset[:split]: read bench NAME from there; a new NAME is a math bench with problem/answer fields"
        },
    )
    limit: int = field(default=0, metadata={"help": "only the first N problems of each bench (0: all)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=2048, metadata={"help": "longest response, in tokens"})
    seed: int = field(default=0, metadata={"help": "sampling seed (reset before each bench)"})
    backend: str = field(
        default="hf",
        metadata={
            "help": "generation engine: hf (hf_backend.HFBackend, as in training) or vllm "
            "(vllm_backend.VLLMBackend; needs vLLM, docs/gpu.md)"
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "sequences per generation batch (and per resumable piece of the run)"}
    )
    vllm_kv_cache_gb: float = field(
        default=2.0, metadata={"help": "vllm on a CPU: GiB of KV cache (how many sequences decode at once)"}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.8, metadata={"help": "vllm on a GPU: share of the card the engine may take"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    code_timeout: float = field(default=10.0, metadata={"help": "seconds per sandboxed test run (code benches)"})
    out: str = field(default="", metadata={"help": "output folder (default: results/eval/<model name>)"})

    def validate(self, need_model: bool = True) -> None:
        if need_model and not self.model:
            raise ValueError("--model is required (a hub id or a local save_pretrained folder)")
        k_values(self.samples)
        checks = {
            "--batch_size": self.batch_size >= 1,
            "--max_new_tokens": self.max_new_tokens >= 1,
            "--limit": self.limit >= 0,
            "--temperature": self.temperature >= 0,
            "--top_p": 0 < self.top_p <= 1,
            "--code_timeout": self.code_timeout > 0,
            "--vllm_kv_cache_gb": self.vllm_kv_cache_gb > 0,
            "--vllm_gpu_memory_utilization": 0 < self.vllm_gpu_memory_utilization <= 1,
        }
        for flag, ok in checks.items():
            if not ok:
                raise ValueError(f"{flag} has an invalid value: {getattr(self, flag[2:])!r}")
        choices = {
            "backend": BACKENDS,
            "dtype": ("auto", "float32", "bfloat16", "float16"),
            "device": ("auto", "cpu", "cuda"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def sampling(self) -> dict:
        """The settings that decide what is sampled (recorded with every bench's result)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "backend": self.backend,
        }


def parse_config(argv: list[str] | None = None, need_model: bool = True) -> EvalConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalConfig, description=__doc__.split("\n\n")[0])
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    config.validate(need_model)
    return config


# --------------------------------------------------------------------------------------------------
# Generation: a responder maps prompts to sampled responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str
    num_tokens: int = 0  # generated tokens, the end-of-sequence token included
    finished: bool = True  # False: cut off at --max_new_tokens


Responder = Callable[[list[str], int], list[list[Generation]]]  # (prompts, n) -> n per prompt


def load_model(config: EvalConfig):
    """Model and tokenizer, through policy.load_policy (pad token set, dtype chosen)."""
    import torch

    import policy

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    device = torch.device(config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    model, tokenizer = policy.load_policy(config.model, policy.PolicyConfig(dtype=dtype), device)
    return model.eval(), tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation config's
    (chat models often have two, e.g. Qwen's <|im_end|> and <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def backend_responder(backend, tokenizer, config: EvalConfig) -> Responder:
    """Sampling with a rollout backend (`sample(prefixes, n, max_new_tokens, temperature, top_p)`),
    stopping at any of the model's stop tokens. The sampling settings are passed explicitly
    (temperature and nucleus sampling, greedy at temperature 0, nothing else), so that what is
    sampled is what summary.json says, not a model's own generation defaults (top_k, repetition
    penalty)."""
    # A chat template writes its own special tokens (BOS included); plain text gets the usual ones.
    add_special = not getattr(tokenizer, "chat_template", None)

    def respond(prompts: list[str], n: int) -> list[list[Generation]]:
        rows = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
        groups = backend.sample(rows, n, config.max_new_tokens, config.temperature, config.top_p)
        # A sample's tokens end with its stop token when it has one; decoding drops it.
        return [
            [Generation(tokenizer.decode(s.tokens, skip_special_tokens=True), len(s.tokens), s.finished) for s in group]
            for group in groups
        ]

    respond.close = getattr(backend, "close", lambda: None)  # an engine to shut down when done
    return respond


def make_responder(config: EvalConfig) -> tuple[Responder, object]:
    """The one place a generation backend is chosen: (responder, tokenizer for the prompts).

    * `hf`: `hf_backend.HFBackend`, the decode loop that samples in training (one prefill per
      prompt shared by its n samples, a KV cache written in place);
    * `vllm`: `vllm_backend.VLLMBackend` reading the model's folder (paged attention, continuous
      batching): on the CPU build faster than the HF loop on long greedy responses (measured:
      docs/evaluation.md, section "The benchmark harness"). Its KV cache is `--vllm_kv_cache_gb` on
      a CPU, and `--vllm_gpu_memory_utilization` of the card on a GPU."""
    if config.backend not in BACKENDS:
        raise ValueError(f"--backend {config.backend!r} is not available (choose from {', '.join(BACKENDS)})")
    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:  # before loading the model
        from vllm_backend import INSTALL_HINT

        raise ValueError(f"--backend vllm needs vLLM: {INSTALL_HINT}")
    model, tokenizer = load_model(config)
    stops = stop_token_ids(model, tokenizer)
    if config.backend == "hf":
        from hf_backend import HFBackend

        backend = HFBackend(model, stops, tokenizer.pad_token_id, config.batch_size)
    else:
        import policy
        from vllm_backend import VLLMBackend

        backend = VLLMBackend(
            model,
            stops,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            kv_cache_gb=config.vllm_kv_cache_gb,
            seed=config.seed,
            path=str(policy.resolve_model(config.model)),
        )
    return backend_responder(backend, tokenizer, config), tokenizer


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    name: str
    metrics: dict  # n, samples, avg@k, pass@k..., lengths, settings
    records: list[dict]  # one per sampled response


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def generate_all(
    prompts: list[str], responder: Responder, config: EvalConfig, desc: str, progress: Path | None = None
) -> tuple[list[list[Generation]], float]:
    """All responses, in batches of about --batch_size sequences, with a progress bar, and the
    seconds spent sampling them.

    Each batch is sampled from the seed --seed + its first prompt's position, so what a batch
    gets does not depend on the batches before it. With `progress` (a JSONL file), every batch's
    responses are appended there as they come, and a rerun with the same model, prompts and
    settings reads the batches already there instead of sampling them again: an interrupted
    evaluation resumes where it stopped, with the results an uninterrupted one would have had."""
    from policy import progress_bar

    per_batch = max(1, config.batch_size // config.samples)  # prompts per batch
    starts = range(0, len(prompts), per_batch)
    made_with = {
        "model": config.model,
        "samples": config.samples,
        "per_batch": per_batch,
        "sampling": config.sampling(),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
    }
    done = read_progress(progress, made_with) if progress else []
    if progress:  # the settings, then the batches kept (a line cut off by an interruption goes)
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [made_with, *done]))
    groups = [[Generation(**g) for g in group] for batch in done for group in batch["groups"]]
    seconds = sum(batch["seconds"] for batch in done)
    for start in progress_bar(starts[len(done) :], desc=desc, unit="batch", initial=len(done), total=len(starts)):
        chunk = prompts[start : start + per_batch]
        seed_everything(config.seed + start)
        began = time.time()
        answered = responder(chunk, config.samples)
        if len(answered) != len(chunk) or any(len(g) != config.samples for g in answered):
            raise RuntimeError(
                f"the responder returned {[len(g) for g in answered]} responses for "
                f"{len(chunk)} prompts x {config.samples} samples"
            )
        elapsed = time.time() - began
        seconds += elapsed
        groups += answered
        if progress:
            batch = {
                "start": start,
                "seconds": elapsed,
                "groups": [[asdict(g) for g in group] for group in answered],
            }
            with open(progress, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(batch, ensure_ascii=False) + "\n")
    return groups, seconds


def read_progress(path: Path, made_with: dict) -> list[dict]:
    """The batches an earlier, interrupted run wrote to `path` with the same settings (none if the
    file is missing or was made otherwise); a last line cut off mid-write is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != json.dumps(made_with):
        return []
    batches = []
    for line in lines[1:]:
        try:
            batches.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return batches


def evaluate_bench(
    name: str, problems: list[Problem], responder: Responder, tokenizer, config: EvalConfig, out: Path | None = None
) -> BenchResult:
    """Sample, grade and score one benchmark; with `out`, resumably (`generate_all`)."""
    prompts = [benchmarks.prompt_for(p, tokenizer) for p in problems]
    desc = f"{name} ({len(problems)} x {config.samples})"
    progress = out / "progress" / f"{name}.jsonl" if out else None
    groups, sampling_seconds = generate_all(prompts, responder, config, desc, progress)
    started = time.time()
    flat = [(p, prompt, j, g) for p, prompt, group in zip(problems, prompts, groups) for j, g in enumerate(group)]
    extracted, correct = benchmarks.grade(
        [p for p, *_ in flat], [g.text for *_, g in flat], code_timeout=config.code_timeout
    )
    records = [
        {
            "bench": name,
            "index": p.index,
            "id": p.id,
            "sample": j,
            "prompt": prompt,
            "response": g.text,
            "extracted": answer,
            "gold": p.gold,
            "correct": score,
            "finished": g.finished,
            "num_tokens": g.num_tokens,
        }
        for (p, prompt, j, g), answer, score in zip(flat, extracted, correct)
    ]
    per_problem = [correct[i * config.samples : (i + 1) * config.samples] for i in range(len(problems))]
    metrics = {
        "n": len(problems),
        "samples": config.samples,
        **bench_metrics(per_problem),
        "mean_response_tokens": sum(g.num_tokens for *_, g in flat) / len(flat),
        "truncated": sum(not g.finished for *_, g in flat) / len(flat),
        "seconds": round(sampling_seconds + time.time() - started, 2),  # sampling (over resumes) and grading
        "sampling": config.sampling(),
        "problems_sha256": problems_fingerprint(problems),
    }
    return BenchResult(name, metrics, records)


def problems_fingerprint(problems: list[Problem]) -> str:
    """A hash of what was asked and graded (ids, questions, gold answers or tests): two results with the
    same fingerprint come from the same problems, whichever folder or hub copy they were read from."""
    asked = [[p.id, p.question, p.gold, p.entry_point, p.completion_prefix] for p in problems]
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()


def results_table(results: list[BenchResult]) -> str:
    """One row per bench; accuracies in percent."""
    metric_names = [key for key in results[0].metrics if key.startswith(("avg@", "pass@"))]
    header = ["bench", "n", "samples", *metric_names, "mean tokens", "truncated"]
    rows = [
        [
            result.name,
            result.metrics["n"],
            result.metrics["samples"],
            *(f"{100 * result.metrics[k]:.1f}" for k in metric_names),
            f"{result.metrics['mean_response_tokens']:.0f}",
            f"{100 * result.metrics['truncated']:.1f}%",
        ]
        for result in results
    ]
    return markdown_table(header, rows) + "\n"


def model_name(config: EvalConfig) -> str:
    return Path(config.model.rstrip("/")).name if config.model else "responder"


def write_outputs(out: Path, config: EvalConfig, results: list[BenchResult]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            for record in result.records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    settings = asdict(config)
    # The data folder by its name only: its path belongs to one machine, and each bench's
    # `problems_sha256` says which problems were read.
    settings["data_dir"] = Path(config.data_dir).name if config.data_dir else ""
    summary = {"model": config.model, "benches": {r.name: r.metrics for r in results}, "config": settings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = results_table(results)
    (out / "summary.md").write_text(f"# {model_name(config)}\n\n{table}")
    return summary


def run(config: EvalConfig, responder: Responder | None = None, tokenizer=None) -> dict:
    """Load every bench first (so missing data, or no sandbox for a code bench, fails before a model
    is loaded), then sample, grade, and write the outputs. `responder` replaces the model when given."""
    data_dir = benchmarks.data_dir_from(config.data_dir)  # None: the pinned hub copies
    names = benchmarks.parse_bench_list(config.bench)
    sources = benchmarks.parse_bench_files(config.bench_file)
    stray = sorted(set(sources) - set(names))
    if stray:
        raise ValueError(f"--bench_file names {', '.join(stray)}, which --bench does not list")
    loaded = {}
    for name in names:
        bench, source = benchmarks.resolve_bench(name, sources, data_dir)
        loaded[name] = benchmarks.load_problems(bench, source, config.limit)
    if any(problem.kind == "code" for problems in loaded.values() for problem in problems):
        sandbox.resolve_sandbox()  # no sandbox to run programs in: say so before any sampling
    if responder is None:
        responder, tokenizer = make_responder(config)
    out = Path(config.out) if config.out else Path("results") / "eval" / model_name(config)
    try:
        results = [
            evaluate_bench(name, problems, responder, tokenizer, config, out) for name, problems in loaded.items()
        ]
    finally:
        getattr(responder, "close", lambda: None)()
    summary = write_outputs(out, config, results)
    shutil.rmtree(out / "progress", ignore_errors=True)  # the outputs now hold every response
    print(results_table(results), end="")
    print(f"wrote {out}/summary.json, summary.md, samples.jsonl")
    return summary


def main(argv: list[str] | None = None, responder: Responder | None = None) -> dict:
    """The command line. `responder` (tests, experiments) replaces the model; then --model may be
    left out and prompts are plain text."""
    try:
        config = parse_config(argv, need_model=responder is None)
        return run(config, responder)
    except (ValueError, sandbox.SandboxUnavailable) as error:
        sys.exit(f"evaluate: error: {error}")


if __name__ == "__main__":
    main()
