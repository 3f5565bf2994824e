"""Shared fixtures: a tiny random Qwen2 model over a 24-token vocabulary (EOS 1, padding 0); the code
sandbox, present (`code_sandbox`) or absent (`no_bwrap`)."""

import pytest
import torch

VOCAB, EOS, PAD = 24, 1, 0


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture
def code_sandbox(monkeypatch):
    """For tests that run programs but do not test the sandbox itself: bubblewrap where it is usable,
    else the weak rlimit mode, opted into explicitly (as a user must), so that they run anywhere."""
    import sandbox

    if not sandbox._bwrap_usable():
        monkeypatch.setenv("TREERL_SANDBOX", "rlimit")


@pytest.fixture
def no_bwrap(monkeypatch):
    """A machine without bubblewrap: no `bwrap` on PATH, no opt-in to the rlimit mode."""
    import os

    import sandbox

    monkeypatch.delenv("TREERL_SANDBOX", raising=False)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not os.path.exists(os.path.join(d, "bwrap"))]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    sandbox._bwrap_problem.cache_clear()  # the probe's verdict is cached per process
    yield
    sandbox._bwrap_problem.cache_clear()


# The tiny Llama of the default run's kind (character vocabulary, 2 layers of width 32): the model
# of the log-prob and packing tests.
@pytest.fixture(scope="module")
def tokenizer():
    import policy

    return policy.build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    import policy

    cfg = policy.PolicyConfig(hidden_size=32, num_layers=2, num_heads=2)
    return policy.build_tiny_model(cfg, tokenizer, seed=0).float()
