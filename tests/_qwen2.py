"""A small random Qwen2 checkpoint (q/k/v biases, tied or untied embeddings) with the embedded task's tokenizer
grown to 512 tokens, so the output layer is a real matrix rather than 16 rows: for tests of precision, adapters
and the vLLM engine on a real architecture."""

from __future__ import annotations

import torch


def qwen2_checkpoint(ckpt: str, path, tied: bool, hidden: int = 128) -> str:
    """Write the checkpoint (float32, seeded: the same weights every time) to ``path``; returns it as a str.
    ``ckpt``: the embedded checkpoint, whose tokenizer is grown; ``hidden``: the width (MLP 2 x hidden)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.add_tokens([f"<w{i}>" for i in range(512 - len(tok))])
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
