"""Train a language model with TreeRL (or the ChainRL baseline): `python train.py`.

The paper's RL training procedure (Section 3: EPTree rollouts, process rewards, a policy-gradient
update, repeated over batches of prompts), as a run: settings, the loop, logging, checkpoints.
The algorithm itself is in tree.py and treerl.py. With no arguments this runs the CPU default end
to end, in minutes, with nothing downloaded:

1. build a small Llama-architecture model and a character-level tokenizer in code, and warm-start
   it with a short supervised stage on worked arithmetic solutions (policy.py, tasks.py), so that
   RL starts from a policy that is right some of the time (RL needs both correct and wrong leaves);
2. run TreeRL: every step grows an EPTree forest per prompt, scores its leaves, turns them into
   per-token process rewards (treerl.rollout) and takes a clipped policy-gradient step
   (treerl.update, with packing.TreeLayout under --pack_tree);
3. report held-out accuracy before and after RL and write `runs/<run_name>/summary.json`,
   `metrics.jsonl` and `metrics.png`.

Every setting is a flag (`python train.py --help`); `--config configs/<preset>.yaml` loads a preset,
and flags given after it override it. `--algo chainrl` trains the baseline on the same budget of
prompts. `--model <hub id or path>` with `--task math --data FILE.jsonl` trains a real model (see
configs/ and docs/gpu.md for the single-GPU presets).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import packing
import policy
import tasks
import treerl
import treeview
from policy import PolicyConfig
from tasks import TaskConfig
from treerl import RolloutConfig, UpdateConfig

# --------------------------------------------------------------------------------------------------
# Settings: this file's own, then those of the modules it drives, composed into one command line
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The run: where results go, the seed, the rollout engine, and the loop."""

    run_name: str = field(default="default", metadata={"help": "results go to <output_dir>/<run_name>/"})
    output_dir: str = field(default="runs", metadata={"help": "parent folder of all runs"})
    seed: int = field(default=0, metadata={"help": "seed of model init, data order and sampling"})
    backend: str = field(
        default="hf",
        metadata={
            "help": "rollout engine: hf (a KV-cache decode loop over the transformers model) or vllm (colocated vLLM engine, needs `pip install vllm`)"
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "vllm: share of the GPU the engine may take (weights, activations, KV cache); the trainer has the rest"
        },
    )
    vllm_kv_cache_gb: float = field(
        default=0.0,
        metadata={"help": "vllm: KV cache size in GiB (0: from vllm_gpu_memory_utilization on a GPU, 0.25 on CPU)"},
    )
    vllm_entropy_top_k: int = field(
        default=20,
        metadata={
            "help": "vllm: log-probs per position the entropy is estimated from (fork_score entropy only; a lower bound, exact when it covers the vocabulary)"
        },
    )
    vllm_sleep: bool = field(
        default=True,
        metadata={
            "help": "vllm on a GPU: free the engine's weights and KV cache during the update (they come back at sync)"
        },
    )
    gen_batch_size: int = field(default=256, metadata={"help": "sequences per generation batch (hf backend)"})
    steps: int = field(default=120, metadata={"help": "RL steps"})
    max_generated_tokens: int = field(
        default=0,
        metadata={
            "help": "stop RL once this many tokens have been generated (0: no limit); compares methods at equal generation cost"
        },
    )
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per RL step (each grows a forest)"})
    eval_every: int = field(
        default=20, metadata={"help": "held-out evaluation every this many steps (0: only before and after)"}
    )
    save_trees: bool = field(
        default=True,
        metadata={
            "help": "at every evaluation, draw the forest of the first held-out problem to <run>/trees/step_XXXX.html (treeview.py)"
        },
    )
    save_every: int = field(default=20, metadata={"help": "checkpoint every this many steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint of this run"})

    def validate(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be one of hf, vllm; got {self.backend!r}")
        for name in ("prompts_per_step", "gen_batch_size", "vllm_entropy_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("steps", "eval_every", "save_every", "max_generated_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1]; got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gb < 0:
            raise ValueError(f"--vllm_kv_cache_gb must be >= 0; got {self.vllm_kv_cache_gb}")


CONFIG_CLASSES = (RunConfig, PolicyConfig, TaskConfig, RolloutConfig, UpdateConfig)


@dataclass
class Config:
    run: RunConfig
    policy: PolicyConfig
    task: TaskConfig
    rollout: RolloutConfig
    update: UpdateConfig

    def as_dict(self) -> dict:
        return {
            key: value
            for part in (self.run, self.policy, self.task, self.rollout, self.update)
            for key, value in asdict(part).items()
        }


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags from the five settings dataclasses (transformers' HfArgumentParser); `--config
    FILE.yaml` supplies defaults that flags given on the command line override."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(CONFIG_CLASSES, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="YAML preset (flags after it override it)")
    if known.config:
        parser.set_defaults(**load_preset(known.config))
    config = Config(*parser.parse_args_into_dataclasses(args=rest)[: len(CONFIG_CLASSES)])
    for part in (config.run, config.policy, config.task, config.rollout, config.update):
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
# The run
# --------------------------------------------------------------------------------------------------


def make_backend(run: RunConfig, model, tokenizer):
    """The rollout engine named by --backend (vLLM is imported only when chosen)."""
    if run.backend == "vllm":
        from vllm_backend import VLLMBackend

        return VLLMBackend(
            model,
            tokenizer.eos_token_id,
            run.vllm_gpu_memory_utilization,
            run.vllm_kv_cache_gb,
            entropy_top_k=run.vllm_entropy_top_k,
            sleep=run.vllm_sleep,
            seed=run.seed,
        )
    from hf_backend import HFBackend

    return HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, run.gen_batch_size)


def evaluate(backend, tokenizer, task: tasks.Task, config: Config) -> dict[str, float]:
    """Held-out accuracy, greedy and avg@k at the training temperature (tasks.evaluate)."""
    return tasks.evaluate(
        backend,
        tokenizer,
        task,
        config.task.eval_samples,
        config.rollout.max_new_tokens,
        config.rollout.temperature,
        config.rollout.top_p,
        seed=config.run.seed,
    )


def save_tree_page(run_dir: Path, step: int, backend, tokenizer, task: tasks.Task, config: Config) -> None:
    """With --save_trees: the forest the policy grows now for the first held-out problem, drawn as a
    page (treeview.py), so a run's pages show its forests change as it learns."""
    if not config.run.save_trees:
        return
    example, rollout = task.eval[0], config.rollout
    root = treeview.grow_forest(backend, tokenizer, task, example, rollout, seed=config.run.seed)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    title = f"{config.run.run_name}, step {step}: {example.prompt.strip()} (gold {example.gold})"
    page = treeview.render_html(root, decode, title, rollout)
    (run_dir / "trees").mkdir(exist_ok=True)
    (run_dir / "trees" / f"step_{step:04d}.html").write_text(page, encoding="utf-8")


def train(config: Config) -> dict:
    run, pcfg, tcfg, rcfg, ucfg = config.run, config.policy, config.task, config.rollout, config.update
    if run.backend == "vllm" and importlib.util.find_spec("vllm") is None:  # say so before the warm start
        raise SystemExit(
            "train.py: error: --backend vllm needs vLLM: pip install -r requirements-gpu.txt "
            "(GPU) or requirements-cpu-vllm.txt (CPU), see docs/gpu.md"
        )
    started = time.perf_counter()
    run_dir = Path(run.output_dir) / run.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.as_dict(), indent=2))
    print("config:", json.dumps(config.as_dict()), flush=True)
    device = policy.pick_device(pcfg)
    random.seed(run.seed)
    torch.manual_seed(run.seed)

    # The policy: from the latest checkpoint (--resume), a hub model (--model), or the tiny model
    # after its supervised warm start, which runs once per run directory and is reused by later
    # runs (and --resume) as long as the settings it was made with are unchanged.
    checkpoint = latest_checkpoint(run_dir) if run.resume else None
    if run.resume and checkpoint is None:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
    warm_dir = run_dir / "warmstart"
    train_size = tasks.arith_train_size(pcfg.warmup_steps * pcfg.warmup_batch_size, run.steps * run.prompts_per_step)
    state = {}
    if checkpoint is None and not pcfg.model:
        model, tokenizer, task = policy.warm_started_policy(pcfg, tcfg, run.seed, warm_dir, device, train_size)
    else:
        if checkpoint is not None:
            print(f"resuming from {checkpoint}", flush=True)
            state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        model, tokenizer = policy.load_policy(str(checkpoint or pcfg.model), pcfg, device)
        task = tasks.build_task(tcfg, tokenizer, train_size)
    print(
        f"task {task.name}: {len(task.train)} training problems, {len(task.eval)} held out; "
        f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters",
        flush=True,
    )

    backend = make_backend(run, model, tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answer_start = treerl.answer_start_fn(decode, task.answer_markers) if task.answer_markers else None
    # The KL reference is the policy RL started from (the hub model or the warm start), also when
    # resuming: never the latest checkpoint.
    ref_model = None
    if ucfg.kl_coef > 0:
        if pcfg.model or (warm_dir / "config.json").exists():
            ref_model = type(model).from_pretrained(pcfg.model or str(warm_dir), dtype=getattr(torch, pcfg.dtype))
        else:  # an untrained tiny model (--warmup_steps 0): rebuilt from the same seed
            ref_model = policy.build_tiny_model(pcfg, tokenizer, run.seed)
        ref_model = ref_model.to(device).eval().requires_grad_(False)

    optimizer, scheduler = treerl.optimizer_for(model, ucfg, run.steps)
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
        before = evaluate(backend, tokenizer, task, config)
        save_tree_page(run_dir, 0, backend, tokenizer, task, config)
        print(
            f"held-out accuracy before RL: greedy {before['greedy']:.1%}, "
            f"avg@{tcfg.eval_samples} {before['sampled']:.1%}",
            flush=True,
        )
        start_step, generated, elapsed_before = 0, 0, 0.0
        metrics_path.write_text(
            json.dumps(
                {"step": 0, "eval_greedy": before["greedy"], "eval_sampled": before["sampled"], "generated_tokens": 0}
            )
            + "\n"
        )
    resumed_at = time.perf_counter()

    # --pack_tree: the same loss with each token of a forest through the model once (packing.py).
    layout = packing.TreeLayout if ucfg.pack_tree else treerl.FlatLayout
    budget_spent = run.max_generated_tokens and generated >= run.max_generated_tokens
    last_step = start_step if budget_spent else run.steps
    progress = policy.progress_bar(
        range(start_step + 1, last_step + 1), desc=f"RL ({rcfg.algo})", initial=start_step, total=run.steps
    )
    after = before
    for step in progress:
        # Each step's prompts and sampling noise depend only on (seed, step): resume-safe.
        torch.manual_seed(run.seed * 1_000_003 + step)
        picked = random.Random(run.seed * 1_000_003 + step).sample(range(len(task.train)), run.prompts_per_step)
        examples = [task.train[i] for i in picked]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
        gpu_peak = policy.GpuPeak(device)
        result = treerl.rollout(
            backend,
            prompts,
            [e.gold for e in examples],
            task.score,
            decode,
            rcfg,
            seed=run.seed * 1_000_003 + step,
            answer_start=answer_start,
        )
        rollout_peak = gpu_peak.read()
        t0 = time.perf_counter()
        stats = {}
        if hasattr(backend, "sleep"):  # vLLM on a GPU: hand the engine's memory to the update
            backend.sleep()
        if result.sequences:
            stats = treerl.update(
                model,
                optimizer,
                scheduler,
                result.sequences,
                ucfg,
                tokenizer.pad_token_id,
                ucfg.train_temperature or rcfg.temperature,
                ref_model,
                seed=step,
                layout=layout,
            )
        t1 = time.perf_counter()
        update_peak = gpu_peak.read()
        backend.sync(model)
        generated += result.stats["generated_tokens"]
        last = step == run.steps or (run.max_generated_tokens and generated >= run.max_generated_tokens)
        row = {
            "step": step,
            **result.stats,
            **stats,
            "sequences": len(result.sequences),
            "time_update": t1 - t0,
            "time_sync": time.perf_counter() - t1,
            "generated_tokens_total": generated,
        }
        if ucfg.pack_tree and result.sequences:
            row["packed_token_ratio"] = packing.token_ratio(result.sequences)
        if device.type == "cuda":
            row.update(gpu_peak_rollout_gb=rollout_peak, gpu_peak_update_gb=update_peak)
        if (run.eval_every and step % run.eval_every == 0) or last:
            after = evaluate(backend, tokenizer, task, config)
            save_tree_page(run_dir, step, backend, tokenizer, task, config)
            row.update(eval_greedy=after["greedy"], eval_sampled=after["sampled"])
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        progress.set_postfix(reward=f"{result.stats['reward']:.2f}", eval=f"{after['sampled']:.2f}", refresh=False)
        if (run.save_every and step % run.save_every == 0) or last:
            save_checkpoint(
                run_dir,
                step,
                model,
                tokenizer,
                optimizer,
                scheduler,
                {
                    "accuracy_before": before,
                    "generated_tokens": generated,
                    "wall_seconds": elapsed_before + time.perf_counter() - resumed_at,
                },
            )
        if last:
            break
    progress.close()

    wall = elapsed_before + (time.perf_counter() - (resumed_at if checkpoint is not None else started))
    summary = {
        "accuracy_before": before["sampled"],
        "accuracy_after": after["sampled"],
        "greedy_accuracy_before": before["greedy"],
        "greedy_accuracy_after": after["greedy"],
        "accuracy_metric": f"held-out avg@{tcfg.eval_samples} at temperature {rcfg.temperature}",
        "generated_tokens": generated,
        "wall_seconds": wall,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": config.as_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hasattr(backend, "close"):  # vLLM: shut the engine down and free its memory
        backend.close()
    plot_metrics(metrics_path, run_dir / "metrics.png", title=f"{rcfg.algo} - {run.run_name}")
    print(
        f"held-out accuracy (avg@{tcfg.eval_samples}): {before['sampled']:.1%} -> {after['sampled']:.1%}; "
        f"greedy: {before['greedy']:.1%} -> {after['greedy']:.1%}; {wall:.0f} s; "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; results in {run_dir}",
        flush=True,
    )
    return summary


# --------------------------------------------------------------------------------------------------
# Checkpoints and the curves
# --------------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, extra: dict) -> None:
    """Model and tokenizer (save_pretrained), optimizer, scheduler, RNG states and step, written to a
    temporary folder and renamed into place: a run killed mid-write never leaves a half checkpoint."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            **extra,
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((run_dir / "checkpoints").glob("step-??????"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-??????"))
    return found[-1] if found else None


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
                ax.plot(
                    *zip(*points), marker="o" if key.startswith("eval") else None, ms=3, label=key.replace("eval_", "")
                )
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
