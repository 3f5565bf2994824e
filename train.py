"""Train a language model with TreeRL (or the ChainRL baseline): `python train.py`.

The paper's RL training procedure (Section 3: EPTree rollouts, process rewards, a policy-gradient
update, repeated over batches of prompts), as a run: the loop, logging, checkpoints, then (at the
end of the file) the settings. The algorithm itself is in tree.py and treerl.py. With no arguments
this runs the CPU default end to end, in minutes, with nothing downloaded:

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
import functools
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
from typing import Literal

import torch

import packing
import policy
import run_folder
import tasks
import treerl
import treeview
import vllm_backend
from policy import PolicyConfig
from settings import arg, check_choices
from tasks import TaskConfig
from treerl import RolloutConfig, UpdateConfig
from vllm_backend import VLLMConfig

# --------------------------------------------------------------------------------------------------
# The run, in three steps: load, start or resume, loop
# --------------------------------------------------------------------------------------------------


def train(config: Config) -> dict:
    """`python train.py`: load, start or resume, loop, then summarize (summary.json)."""
    started = time.perf_counter()
    run = load(config)
    state = start_or_resume(run)
    loop(run, state)
    return summarize(run, state, started)


@dataclass
class Run:
    """What `load` builds, fixed for the whole run."""

    config: Config
    dir: Path  # <output_dir>/<run_name>
    device: torch.device
    model: torch.nn.Module  # the policy
    tokenizer: object
    task: tasks.Task
    backend: treerl.Backend  # the rollout engine (--backend)
    ref_model: torch.nn.Module | None  # the KL reference (--kl_coef > 0)
    checkpoint: Path | None  # the checkpoint the policy came from (--resume), else None
    memory: policy.RssPeaks  # peak memory (RSS) of each phase: warm start, rollout, update, evaluation

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load(config: Config) -> Run:
    """The policy, its tokenizer, the task, the rollout engine and the KL reference. The policy is the
    latest checkpoint (--resume), else --model (or the tiny model) after its supervised warm start,
    which runs once per run directory and is reused by later runs while its settings are unchanged."""
    run, pcfg = config.run, config.policy
    if run.backend == "vllm" and importlib.util.find_spec("vllm") is None:  # say so before the warm start
        raise SystemExit(f"train.py: error: --backend vllm needs vLLM: {vllm_backend.INSTALL_HINT}")
    run_dir = run_folder.open_run_dir(config)  # a folder holds one run's settings, or stops the command
    print("config:", json.dumps(config.as_dict()), flush=True)
    device = policy.pick_device(pcfg)
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    found = sorted((run_dir / "checkpoints").glob("step-??????")) if run.resume else []  # oldest first
    checkpoint = found[-1] if found else None
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    elif run.resume:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
    warm_dir = run_dir / "warmstart"
    train_size = tasks.arith_train_size(pcfg.warmup_steps * pcfg.warmup_batch_size, run.steps * run.prompts_per_step)
    memory = policy.RssPeaks(lean_heap=pcfg.lean_heap)  # with it, resident memory is what is in use
    if checkpoint is None:
        with memory.phase("warm_start"):
            model, tokenizer, task = policy.warm_started_policy(
                pcfg, config.task, run.seed, warm_dir, device, train_size
            )
    else:
        model, tokenizer = policy.load_policy(str(checkpoint), pcfg, device)
        task = tasks.build_task(config.task, tokenizer, train_size)
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    print(
        f"task {task.name}: {len(task.train)} training problems, {len(task.eval)} held out; policy: {size}", flush=True
    )
    backend = make_backend(config, model, tokenizer)
    # The KL reference is the policy RL started from (the warm start, else --model), also when
    # resuming: never the latest checkpoint.
    ref_model = None
    if config.update.kl_coef > 0:
        start = warm_dir if (warm_dir / "config.json").exists() else policy.resolve_model(pcfg.model)
        if start:
            ref_model = type(model).from_pretrained(start, dtype=getattr(torch, pcfg.dtype))
        else:  # an untrained tiny model (--warmup_steps 0): rebuilt from the same seed
            ref_model = policy.build_tiny_model(pcfg, tokenizer, run.seed)
        ref_model = ref_model.to(device).eval().requires_grad_(False)
    return Run(config, run_dir, device, model, tokenizer, task, backend, ref_model, checkpoint, memory)


@dataclass
class State:
    """Where the loop stands: what a checkpoint saves beside the weights (trainer_state.pt)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int  # the last step taken (0: none)
    before: dict[str, float]  # held-out accuracy before RL, greedy and sampled
    after: dict[str, float]  # held-out accuracy at the latest evaluation
    generated: int = 0  # tokens generated by all steps so far
    elapsed: float = 0.0  # wall seconds of the processes this run resumed from
    resumed_at: float = field(default_factory=time.perf_counter)  # when this process's steps began


def start_or_resume(run: Run) -> State:
    """A fresh start evaluates the policy before RL and starts metrics.jsonl; a resumed run restores
    the optimizer, scheduler, random state and counters of its checkpoint."""
    optimizer, scheduler = treerl.optimizer_for(run.model, run.config.update, run.config.run.steps)
    metrics_path = run.dir / "metrics.jsonl"
    if run.checkpoint is not None:
        saved = torch.load(run.checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        random.setstate(saved["rng"]["python"])
        torch.set_rng_state(saved["rng"]["torch"])
        step, before = saved["step"], saved["accuracy_before"]
        # Drop metrics logged after the checkpoint: the resumed run logs them again.
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        return State(optimizer, scheduler, step, before, before, saved["generated_tokens"], saved["wall_seconds"])
    before = evaluate(run)
    save_tree_page(run, 0)
    k = run.config.task.eval_samples
    print(f"held-out accuracy before RL: greedy {before['greedy']:.1%}, avg@{k} {before['sampled']:.1%}", flush=True)
    row = {"step": 0, "eval_greedy": before["greedy"], "eval_sampled": before["sampled"], "generated_tokens": 0}
    metrics_path.write_text(json.dumps(row) + "\n")
    return State(optimizer, scheduler, 0, before, before)


def loop(run: Run, state: State) -> None:
    """RL steps from state.step + 1 to --steps, or until --max_generated_tokens are spent: each logs a
    row of metrics.jsonl; evaluations and checkpoints come every --eval_every and --save_every steps
    and after the last one."""
    cfg = run.config.run
    budget = cfg.max_generated_tokens or float("inf")  # --max_generated_tokens 0: no limit
    last_step = state.step if state.generated >= budget else cfg.steps
    steps = range(state.step + 1, last_step + 1)
    progress = policy.progress_bar(steps, desc=f"RL ({run.config.rollout.algo})", initial=state.step, total=cfg.steps)
    for step in progress:
        run.memory.last.clear()  # the row below records this step's phases only
        row = rl_step(run, state, step)
        state.step, last = step, step == cfg.steps or state.generated >= budget
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            state.after = evaluate(run)
            save_tree_page(run, step)
            row.update(eval_greedy=state.after["greedy"], eval_sampled=state.after["sampled"])
        row.update({f"peak_rss_gib_{phase}": gib for phase, gib in run.memory.last.items()})
        with (run.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        progress.set_postfix(reward=f"{row['reward']:.2f}", eval=f"{state.after['sampled']:.2f}", refresh=False)
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            save_checkpoint(run, state)
        if last:
            break
    progress.close()


def step_prompts(task, tokenizer, run_seed: int, step: int, count: int) -> tuple[int, list, list[list[int]]]:
    """Step `step`'s seed, its `count` training examples and their prompt token ids. They depend only
    on (run seed, step), so a resumed run draws what the interrupted one would have drawn."""
    seed = run_seed * 1_000_003 + step
    examples = [task.train[i] for i in random.Random(seed).sample(range(len(task.train)), count)]
    return seed, examples, [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]


def rl_step(run: Run, state: State, step: int) -> dict:
    """One step: grow and score forests for a batch of prompts (treerl.rollout), update the policy
    (treerl.update) and give the rollout engine the new weights; returns the step's metrics."""
    cfg, rcfg, ucfg = run.config.run, run.config.rollout, run.config.update
    seed, examples, prompts = step_prompts(run.task, run.tokenizer, cfg.seed, step, cfg.prompts_per_step)
    torch.manual_seed(seed)  # the step's sampling noise, like its prompts, depends only on (seed, step)
    markers = run.task.answer_markers  # EPTree never forks inside the final answer
    answer_start = treerl.answer_start_fn(run.decode, markers) if markers else None
    step_truth = tasks.step_truth_on_ids(run.task, run.decode)  # for the --blame experiment
    gpu_peak = policy.GpuPeak(run.device)
    golds = [e.gold for e in examples]
    with run.memory.phase("rollout"):
        where = dict(seed=seed, answer_start=answer_start, step_truth=step_truth)
        result = treerl.rollout(run.backend, prompts, golds, run.task.score, run.decode, rcfg, **where)
    rollout_peak, t0 = gpu_peak.read(), time.perf_counter()
    if hasattr(run.backend, "sleep"):  # vLLM on a GPU: hand the engine's memory to the update
        run.backend.sleep()
    # --pack_tree: the same loss with each token of a forest through the model once (packing.py);
    # trees of a forest, as many as a micro-batch holds, share one copy of the prompt where the
    # model's shape makes one longer row cheaper than a row per tree.
    layout = treerl.FlatLayout
    if ucfg.pack_tree:
        kappa = packing.attention_cost(run.model.config)
        layout = functools.partial(
            packing.TreeLayout,
            attention_cost=kappa,
            row_leaves=ucfg.micro_batch_size,
            row_tokens=ucfg.micro_batch_tokens,
        )
    stats, temperature = {}, ucfg.train_temperature or rcfg.temperature
    if result.sequences:
        with run.memory.phase("update"):
            stats = treerl.update(
                run.model,
                state.optimizer,
                state.scheduler,
                result.sequences,
                ucfg,
                run.tokenizer.pad_token_id,
                temperature,
                run.ref_model,
                seed=step,
                layout=layout,
            )
    t1, update_peak = time.perf_counter(), gpu_peak.read()
    run.backend.sync(run.model)
    state.generated += result.stats["generated_tokens"]
    row = {"step": step, **result.stats, **stats, "sequences": len(result.sequences), "time_update": t1 - t0}
    row.update(time_sync=time.perf_counter() - t1, generated_tokens_total=state.generated)
    if ucfg.pack_tree and result.sequences:
        row["packed_token_ratio"] = packing.token_ratio(result.sequences)
    if run.device.type == "cuda":
        row.update(gpu_peak_rollout_gb=rollout_peak, gpu_peak_update_gb=update_peak)
    return row


def summarize(run: Run, state: State, started: float) -> dict:
    """summary.json, the curves (metrics.png) and a closing line."""
    config, before, after = run.config, state.before, state.after
    # A fresh run counts from its start (warm start included); a resumed one adds its own steps' time.
    wall = state.elapsed + time.perf_counter() - (state.resumed_at if run.checkpoint else started)
    summary = {
        "accuracy_before": before["sampled"],
        "accuracy_after": after["sampled"],
        "greedy_accuracy_before": before["greedy"],
        "greedy_accuracy_after": after["greedy"],
        "accuracy_metric": f"held-out avg@{config.task.eval_samples} at temperature {config.rollout.temperature}",
        "generated_tokens": state.generated,
        "wall_seconds": wall,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_gib_by_phase": run.memory.by_phase,  # each phase's largest peak over the run
        "config": config.as_dict(),
    }
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hasattr(run.backend, "close"):  # vLLM: shut the engine down and free its memory
        run.backend.close()
    title = f"{config.rollout.algo} - {config.run.run_name}"
    treeview.plot_metrics(run.dir / "metrics.jsonl", run.dir / "metrics.png", title)
    print(
        f"held-out accuracy (avg@{config.task.eval_samples}): {before['sampled']:.1%} -> {after['sampled']:.1%}; "
        f"greedy: {before['greedy']:.1%} -> {after['greedy']:.1%}; {wall:.0f} s; "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; results in {run.dir}",
        flush=True,
    )
    return summary


def make_backend(config: Config, model, tokenizer) -> treerl.Backend:
    """The rollout engine named by --backend (vllm_backend imports vLLM only when it starts)."""
    if config.run.backend == "vllm":
        return vllm_backend.VLLMBackend.from_config(model, tokenizer.eos_token_id, config.vllm, config.run.seed)
    from hf_backend import HFBackend

    run = config.run
    cap = int(run.gen_kv_cache_gib * 2**30)  # fewer rows per batch where their KV cache would pass it
    return HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id, run.gen_batch_size, kv_cache_bytes=cap)


def evaluate(run: Run) -> dict[str, float]:
    """Held-out accuracy, greedy and avg@k at the training temperature (tasks.evaluate)."""
    k, rollout = run.config.task.eval_samples, run.config.rollout
    sampling = (k, rollout.max_new_tokens, rollout.temperature, rollout.top_p)
    with run.memory.phase("evaluation"):
        return tasks.evaluate(run.backend, run.tokenizer, run.task, *sampling, seed=run.config.run.seed)


def save_tree_page(run: Run, step: int) -> None:
    """With --save_trees: the forest the policy grows now for the first held-out problem, drawn as a
    page (treeview.py), so a run's pages show its forests change as it learns."""
    config = run.config
    if not config.run.save_trees:
        return
    example = run.task.eval[0]
    root = treeview.grow_forest(run.backend, run.tokenizer, run.task, example, config.rollout, seed=config.run.seed)
    title = f"{config.run.run_name}, step {step}: {example.prompt.strip()} (gold {example.gold})"
    (run.dir / "trees").mkdir(exist_ok=True)
    page = treeview.render_html(root, run.decode, title, config.rollout)
    (run.dir / "trees" / f"step_{step:04d}.html").write_text(page, encoding="utf-8")


def save_checkpoint(run: Run, state: State) -> None:
    """Model and tokenizer (save_pretrained), optimizer, scheduler, RNG states and counters, written to
    a temporary folder and renamed into place: a run killed mid-write never leaves a half checkpoint."""
    final = run.dir / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}
    saved = {"step": state.step, "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()}
    saved.update(rng=rng, accuracy_before=state.before, generated_tokens=state.generated)
    saved["wall_seconds"] = state.elapsed + time.perf_counter() - state.resumed_at
    torch.save(saved, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    run_folder.prune_checkpoints(final)  # keep the last two, never the one just written


# --------------------------------------------------------------------------------------------------
# Settings: this file's own, then those of the modules it drives, composed into one command line
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The run: where results go, the seed, the rollout engine, and the loop."""

    run_name: str = arg("default", "results go to <output_dir>/<run_name>/")
    output_dir: str = arg("runs", "parent folder of all runs")
    seed: int = arg(0, "seed of model init, data order and sampling")
    backend: Literal["hf", "vllm"] = arg("hf", "rollout engine: transformers (hf) or a colocated vLLM engine")
    gen_batch_size: int = arg(256, "sequences per generation batch (hf backend)")
    gen_kv_cache_gib: float = arg(0.0, "most KV-cache memory (GiB) of one generation batch (hf backend; 0: no limit)")
    steps: int = arg(120, "RL steps")
    max_generated_tokens: int = arg(0, "stop RL after this many generated tokens (0: no limit)")
    prompts_per_step: int = arg(16, "prompts per RL step (each grows a forest)")
    eval_every: int = arg(20, "held-out evaluation every this many steps (0: only before and after)")
    save_trees: bool = arg(True, "at every evaluation, draw a held-out forest to <run>/trees/ (treeview.py)")
    save_every: int = arg(20, "checkpoint every this many steps (0: only at the end)")
    resume: bool = arg(False, "continue this run from its latest checkpoint (only with the folder's settings)")
    overwrite: bool = arg(False, "start over: clear <output_dir>/<run_name>/ first, whatever run it holds")

    def validate(self) -> None:
        check_choices(self, RunConfig)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the folder's run and --overwrite discards it: give one of them")
        for name in ("prompts_per_step", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("steps", "eval_every", "save_every", "max_generated_tokens", "gen_kv_cache_gib"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")


CONFIG_CLASSES = (RunConfig, VLLMConfig, PolicyConfig, TaskConfig, RolloutConfig, UpdateConfig)


@dataclass
class Config:
    run: RunConfig
    vllm: VLLMConfig
    policy: PolicyConfig
    task: TaskConfig
    rollout: RolloutConfig
    update: UpdateConfig

    def as_dict(self) -> dict:
        """Every setting by flag name, the vLLM ones after --backend: the order in which the settings
        recorded in results/ are compared (eval/compare_rl.py)."""
        run = list(asdict(self.run).items())
        at = [key for key, _ in run].index("backend") + 1
        rest = [item for part in (self.policy, self.task, self.rollout, self.update) for item in asdict(part).items()]
        return dict(run[:at] + list(asdict(self.vllm).items()) + run[at:] + rest)


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags from the settings dataclasses (transformers' HfArgumentParser: a field's type, default
    and help make a flag, a Literal its choices); `--config FILE.yaml` supplies defaults that flags
    given on the command line override."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(CONFIG_CLASSES, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="YAML preset (flags after it override it)")
    if known.config:
        parser.set_defaults(**load_preset(known.config))
    config = Config(*parser.parse_args_into_dataclasses(args=rest)[: len(CONFIG_CLASSES)])
    for part in fields(config):
        getattr(config, part.name).validate()
    if config.rollout.blame != "none" and config.task.task not in ("arith", "arith_chat"):
        raise ValueError(f"--blame {config.rollout.blame} needs an arithmetic task (--task arith or arith_chat)")
    return config


def load_preset(path: str) -> dict:
    """A preset: a mapping of flag names to values."""
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"--config: no such file {path!r}")
    with open(path) as f:
        preset = yaml.safe_load(f) or {}
    if not isinstance(preset, dict):
        raise ValueError(f"{path}: a preset is a mapping of flag names to values")
    unknown = sorted(set(preset) - {f.name for cls in CONFIG_CLASSES for f in fields(cls)})
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (see python train.py --help)")
    return preset  # its values are checked with the flags' (Config.validate)


def main(argv: list[str] | None = None) -> dict:
    try:
        config = parse_config(argv)
    except ValueError as error:
        sys.exit(f"train.py: error: {error}")
    return train(config)


if __name__ == "__main__":
    main()
