"""The vLLM rollout backend: a colocated vLLM engine with prefix caching and in-place weight sync.

Skip this file on a first reading: it implements `treerl.Backend` with vLLM (`--backend vllm`), for
speed on a GPU with a real model. It adds paged attention and a prefix cache (a fork's prefix is
not recomputed), sleep/wake around the update, and weight sync after every optimizer step.
vLLM is optional and imported only when this backend starts; `VLLMConfig`, this backend's
settings, is what train.py reads from here without it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_backend import budgets_per_prefix, stop_token_list
from settings import arg
from tree import Sample

logger = logging.getLogger(__name__)


@dataclass
class VLLMConfig:
    """The engine's settings, flags of train.py (used with `--backend vllm`; docs/gpu.md sizes them)."""

    vllm_gpu_memory_utilization: float = arg(0.3, "share of the GPU the engine may take; the trainer has the rest")
    vllm_kv_cache_gb: float = arg(0.0, "KV cache in GiB (0: from the share above on a GPU, 0.25 on CPU)")
    vllm_entropy_top_k: int = arg(20, "log-probs per position that estimate the entropy fork score")
    vllm_sleep: bool = arg(True, "GPU: free the engine's weights and KV cache during the update")

    def validate(self) -> None:
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1]; got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gb < 0:
            raise ValueError(f"--vllm_kv_cache_gb must be >= 0; got {self.vllm_kv_cache_gb}")
        if self.vllm_entropy_top_k < 1:
            raise ValueError(f"--vllm_entropy_top_k must be >= 1; got {self.vllm_entropy_top_k}")


def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Entropy of a next-token distribution known only through the log-probs of its k most likely
    tokens (what vLLM returns), an approximation of H = -sum_v p_v log p_v.

    The k seen tokens contribute their terms exactly. The unseen tail holds the rest of the mass,
    r = 1 - sum_k p_i, and each tail token is at most as likely as the k-th one, so each of its
    terms has -log q >= -log p_k. Counting the whole tail at that rate gives

        H  ~=  -sum_{i<=k} p_i log p_i  -  r log p_k        (a lower bound on H)

    exact when k covers the vocabulary (r = 0), and close to H when the distribution is peaked
    (r small), which is where a fork decision is made: the top-k tokens of an LLM usually hold
    nearly all the mass. Non-finite entries (tokens cut by top-p) are ignored.
    """
    logps = [lp for lp in top_logprobs if math.isfinite(lp)]
    if not logps:
        return 0.0
    probs = [math.exp(lp) for lp in logps]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * lp for p, lp in zip(probs, logps)) - tail * min(logps)


# What to install for the vllm backend; train.py and eval/evaluate.py say it before loading a model.
INSTALL_HINT = "pip install -r requirements-gpu.txt (GPU) or requirements-cpu-vllm.txt (CPU), see docs/gpu.md"


class VLLMBackend:
    """Sampling with vLLM, colocated: the engine runs inside the training process, beside the model.

    What vLLM adds over `generate` for EPTree: paged attention with a prefix cache. The KV of a
    prefix (the prompt, and for every fork the response up to the fork point) is computed once and
    re-used by the n samples of a request and by later requests that start with it, so the T
    continuations of a fork cost only their new tokens. (The cache works in whole KV blocks: a
    prefix shorter than one block is recomputed.)

    The engine holds its own copy of the weights. `sync(model)` copies the trainer's weights into
    it after every optimizer step, in place, and empties the prefix cache, whose KV was computed
    with the old weights. How the engine is set up, and why:

    * token-id prompts and no tokenizer in the engine (`skip_tokenizer_init`): the trainer
      tokenizes; the engine stops at `eos_token_id` (one id or a list) and nowhere else
      (`ignore_eos` turns off the model config's own end tokens, `stop_token_ids` puts ours
      back), as HFBackend does;
    * dummy start: only config.json is written and the engine starts with random weights
      (`load_format="dummy"`); the first `sync` loads the trainer's, so nothing is read from disk
      (`path`, a save_pretrained folder of the same weights, makes the engine read them instead);
    * memory: on a GPU the engine may take `gpu_memory_utilization` of the card (its weights,
      activations and KV cache; the trainer has the rest), or exactly `kv_cache_gb` of KV cache;
      on the CPU build the KV cache is always sized by `kv_cache_gb` (default 0.25 GiB), since
      vLLM would otherwise reserve a share of the machine's memory;
    * sleep (GPU only, on by default there): `sleep()` frees the engine's weights and KV cache so
      that the update has the memory, and `sync` brings them back. Level 2, no CPU copy of the
      weights, because `sync` overwrites them anyway;
    * log-probs (`logprobs_mode="processed_logprobs"`): vLLM reports log-probs of softmax(logits/T),
      the temperature-scaled distribution, like `logprobs.token_stats`; greedy decoding reports T = 1.
      With top_p < 1 they are of the nucleus distribution that was actually sampled (renormalised
      after the cut), where HFBackend reports the distribution before the cut. The update never
      uses them as old log-probs (it recomputes those), only the fork scores do;
    * fork scores: `nll` is -log p of the chosen token, exact; `entropy` is `topk_entropy` over
      the `entropy_top_k` log-probs vLLM returns per position (exact when that covers the vocabulary);
    * randomness: each request gets a seed drawn from torch's global generator, so
      `torch.manual_seed` fixes the samples, as it does for HFBackend (vLLM gives the i-th of n
      samples seed + i).

    vLLM is imported here, not at the top of the module: the project runs without it.
    VLLM_ENABLE_V1_MULTIPROCESSING=0 (set unless the user set it) keeps the engine in this process,
    which in-place weight loading needs; scripts that build this backend keep their entry point
    under `if __name__ == "__main__":`, as vLLM asks. On the CPU build the engine also pins this
    process's OpenMP threads to the cores and turns later `torch.set_num_threads` calls into
    no-ops: the trainer shares its threads.
    """

    def __init__(
        self,
        model,
        eos_token_id: int | Sequence[int],
        gpu_memory_utilization: float = 0.3,
        kv_cache_gb: float = 0.0,
        entropy_top_k: int = 20,
        sleep: bool | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int | None = None,
        path: str | None = None,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        self.stop_ids = stop_token_list(eos_token_id)
        self.top_k = entropy_top_k
        self.sleep_enabled = on_gpu if sleep is None else (sleep and on_gpu)
        self.asleep = False
        self.workdir = tempfile.mkdtemp(prefix="treerl-vllm-")
        # Running totals, for the benchmark and the logs.
        self.stats = {
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "generated_tokens": 0,
            "syncs": 0,
            "sync_seconds": 0.0,
            "fallback_syncs": 0,
        }
        self.engine_args = dict(
            dtype=str(model.dtype).removeprefix("torch."),
            seed=seed,
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
            max_logprobs=entropy_top_k,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            max_model_len=max_model_len,
            enable_sleep_mode=self.sleep_enabled,
            # CUDA graphs on a GPU; eager on the CPU build (no graph to capture, no compile time).
            enforce_eager=not on_gpu,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=int((kv_cache_gb or (0.0 if on_gpu else 0.25)) * 2**30) or None,
            # Only whole KV blocks are cached. vLLM's CPU default (128 tokens) is longer than a
            # whole response of the CPU task; 32 is the smallest size its CPU kernels prefer.
            block_size=block_size or (None if on_gpu else 32),
            # On the CPU build, a prompt whose prefill is split over two engine steps ("chunked
            # prefill") crashes seeded sampling (vLLM rewinds the request's torch.Generator with
            # set_offset, which CPU generators lack); so on CPU every prefill runs in one step.
            enable_chunked_prefill=None if on_gpu else False,
        )
        if path is not None:  # a saved checkpoint of `model` (save_pretrained): read it
            self.llm = self._start_engine(path, load_format="auto")
        else:
            _save_config(model, self.workdir)
            self.llm = self._start_engine(self.workdir, load_format="dummy")
            self.sync(model)

    @classmethod
    def from_config(cls, model, eos_token_id: int, cfg: VLLMConfig, seed: int = 0) -> VLLMBackend:
        """The engine as train.py's `--vllm_*` flags set it up."""
        return cls(
            model,
            eos_token_id,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            kv_cache_gb=cfg.vllm_kv_cache_gb,
            entropy_top_k=cfg.vllm_entropy_top_k,
            sleep=cfg.vllm_sleep,
            seed=seed,
        )

    def _start_engine(self, path: str, load_format: str):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(f"the vllm backend needs vLLM: {INSTALL_HINT}") from error
        _quiet_rotary_reload_warning()
        return LLM(model=path, load_format=load_format, **self.engine_args)

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, prefixes, n, max_new_tokens, temperature=1.0, top_p=1.0):
        from vllm import SamplingParams

        if self.asleep:
            raise RuntimeError("VLLMBackend.sample: the engine is asleep; call sync(model) first")
        greedy = temperature == 0
        # One request of n samples per prefix; vLLM allows n > 1 only when sampling, so greedy
        # decoding sends n copies of the request instead (the prefix cache shares their KV).
        copies, per_request = (n, 1) if greedy else (1, n)
        rows = [list(p) for p in prefixes for _ in range(copies)]
        budgets = [b for b in budgets_per_prefix(max_new_tokens, len(prefixes)) for _ in range(copies)]
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        params = [
            SamplingParams(
                n=per_request,
                max_tokens=budget,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                seed=None if greedy else seed,
                ignore_eos=True,
                stop_token_ids=self.stop_ids,
                logprobs=self.top_k,
                detokenize=False,
                flat_logprobs=True,
            )  # top-k log-probs as flat lists, not one dict per token
            for seed, budget in zip(seeds, budgets)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        samples = []
        for row, out in zip(rows, outputs):
            self.stats["prompt_tokens"] += len(row)
            self.stats["cached_prompt_tokens"] += out.num_cached_tokens or 0
            samples += [self._to_sample(c) for c in out.outputs]
        return [samples[i * n : (i + 1) * n] for i in range(len(prefixes))]

    def _to_sample(self, completion) -> Sample:
        """One vLLM completion as a tree.Sample: tokens, chosen-token log-probs, entropies."""
        tokens = list(completion.token_ids)
        logprobs, entropies = [], []
        for token, (ids, values, ranks) in zip(tokens, _positions(completion.logprobs)):
            # Each position holds the k most likely tokens, plus the chosen one if it is not
            # among them (rank > k).
            logprobs.append(values[ids.index(token)])
            entropies.append(topk_entropy([v for v, r in zip(values, ranks) if r <= self.top_k]))
        self.stats["generated_tokens"] += len(tokens)
        finished = bool(tokens) and tokens[-1] in self.stop_ids
        return Sample(tokens, logprobs, entropies, finished)

    # ---- weights --------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (GPU only; a no-op elsewhere)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def sync(self, model) -> None:
        """Make the engine's weights equal the trainer's, and forget all cached KV."""
        started = time.perf_counter()
        if self.asleep:
            torch.cuda.empty_cache()  # give back what the update's activations left cached
            self.llm.wake_up(tags=["weights"])  # memory for the weights first, KV cache later
        try:
            self._load_in_place(model)
        except Exception as error:  # noqa: BLE001 - any failure: fall back to the slow path
            logger.warning(
                "vLLM: in-place weight loading failed (%s: %s); falling back to saving "
                "the model and restarting the engine from it (slow)",
                type(error).__name__,
                error,
            )
            self._restart_from_disk(model)
            self.stats["fallback_syncs"] += 1
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # The cached KV was computed with the old weights: never serve it again.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self.stats["syncs"] += 1
        self.stats["sync_seconds"] += time.perf_counter() - started

    def _load_in_place(self, model) -> None:
        """Copy the trainer's tensors into the engine's model, in place.

        Not `model.load_weights` on the engine's model: the CPU build repacks some weights after
        loading (its linear layers keep them in a kernel layout and drop the parameters'
        `weight_loader`), so a second `load_weights` fails there. The worker's `reload_weights`
        undoes that processing layer by layer, loads checkpoint-format tensors with each model's
        own name mapping (q/k/v into one qkv matrix, tied embeddings, ...) and processes them again;
        it is the same call on the GPU and CPU builds. The engine runs in this process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the tensors are handed over by reference, not copied.
        """
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})

    def _restart_from_disk(self, model) -> None:
        """The fallback: save the model, shut the engine down and start a new one that reads it."""
        path = os.path.join(self.workdir, "weights")
        model.save_pretrained(path)
        self._stop_engine()
        self.llm = self._start_engine(path, load_format="auto")
        self.asleep = False  # a new engine starts awake

    def close(self) -> None:
        """Shut the engine down, free its memory and delete its folder (the backend is unusable
        afterwards)."""
        self._stop_engine()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_engine(self) -> None:
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None
        del llm
        # vLLM's process groups (one process, world size 1) are set up again by the next engine.
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _positions(logprobs):
    """(token ids, log-probs, ranks) at each position of a completion's top-k log-probs, from vLLM's
    flat format (FlatLogprobs: one list of each for all positions, sliced by start/end indices) or
    the list of {token: Logprob} dicts it returns otherwise. The flat format lists the chosen token
    first and again among the top k when it is one of them; each token is kept once."""
    if hasattr(logprobs, "start_indices"):
        for lo, hi in zip(logprobs.start_indices, logprobs.end_indices):
            first = {}  # token id -> index of its first entry
            for i, token in enumerate(logprobs.token_ids[lo:hi], start=lo):
                first.setdefault(token, i)
            keep = list(first.values())
            yield (
                [logprobs.token_ids[i] for i in keep],
                [logprobs.logprobs[i] for i in keep],
                [logprobs.ranks[i] for i in keep],
            )
    else:
        for top in logprobs:
            yield list(top), [lp.logprob for lp in top.values()], [lp.rank for lp in top.values()]


def _quiet_rotary_reload_warning() -> None:
    """Drop one message of vLLM's in-place reload, "RotaryEmbedding: Failed to load weights",
    printed at every sync: the rotary layer's cos/sin table is a buffer that no checkpoint holds,
    so vLLM puts back the table it computed at start-up, which is right (the sync tests compare
    the outputs with transformers')."""
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(getattr(f, "treerl", False) for f in reload_logger.filters):

        def keep(record: logging.LogRecord) -> bool:
            return not (record.getMessage().startswith("RotaryEmbedding") and "Failed to load" in record.getMessage())

        keep.treerl = True
        reload_logger.addFilter(keep)


def _save_config(model, path: str) -> None:
    """config.json for the engine: the trainer's config, with the architecture named (a model built
    in code has none until save_pretrained)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
