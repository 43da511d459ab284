"""Shared by the vLLM tests: the KV-cache bound of every engine they build, a small Qwen2 checkpoint, and
callbacks for the fit tests' subprocesses that write what each rank saw to <out>/rank<r>.json."""

import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

# every engine here holds a small, bounded KV cache (unbounded, vLLM's CPU engine takes most of the machine)
KV_CACHE_BYTES = 256 << 20


def qwen2_checkpoint(ckpt: str, path, tied: bool) -> str:
    """A small Qwen2 checkpoint (q/k/v biases; tied or untied embeddings) with the embedded task's tokenizer
    grown to 512 tokens, so the output layer is a real matrix (512 x 128) rather than 16 rows."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.add_tokens([f"<w{i}>" for i in range(512 - len(tok))])
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
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


class EngineReport(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.samplers: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samplers.append(pl_module.sampler.engine is not None)

    def teardown(self, trainer, pl_module, stage) -> None:
        """After on_fit_end closed the engines: the trainer's process group must still work."""
        reduced = None
        if dist.is_available() and dist.is_initialized():
            t = torch.ones(1)
            dist.all_reduce(t)
            reduced = float(t.item())
        report = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "engine_during_steps": self.samplers,
            "engine_after_fit": pl_module.sampler.engine is not None,
            "all_reduce_after_fit": reduced,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class PolicyLogits(L.Callback):
    """At fit end (one process), writes the live policy's logits on fixed token ids to <out>/logits.json:
    what an exported model must reproduce."""

    IDS = [[1, 5, 6, 7, 8, 9, 10, 11], [3, 4, 12, 13, 14, 2, 5, 7]]

    def __init__(self, out: str):
        self.out = Path(out)

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        ids = torch.tensor(self.IDS)
        logits = pl_module.policy.logits(ids, torch.ones_like(ids))
        (self.out / "logits.json").write_text(json.dumps(logits.float().tolist()))
