"""Shared fixtures: a tiny random Qwen2 model over a 24-token vocabulary (EOS 1, padding 0)."""

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
