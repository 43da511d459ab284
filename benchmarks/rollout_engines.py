"""Rollout throughput: lit-align's own sampler (the HF path) against the colocated vLLM engine.

    python benchmarks/rollout_engines.py                  # CPU: a random ~10M-parameter Llama, float32
    python benchmarks/rollout_engines.py --qwen2-0.5b --device cuda --dtype bfloat16   # GPU (see _gpu.sh)
    python benchmarks/rollout_engines.py --quick          # smoke test

Both paths sample the same prompts x G rows with the same settings (temperature 1, every completion
exactly --max-new-tokens long: the end token is masked until then, so both produce the same number of
tokens). Timed, after one untimed warm-up call each, as the median of --repeats calls:

- ``hf``: :func:`lit_align.rollout.generate`, the sampler ``model.rollout_engine=hf`` runs (its KV-cache
  loop; log-probs and entropies come out of the decoding itself);
- ``vllm``: :meth:`lit_align.vllm_engine.VLLMEngine.generate` (token ids and the engine's log-probs);
- ``vllm+score``: that plus the one no-grad forward over prompt + completion by which lit-align's vLLM
  path computes ``old_logp`` and the entropies with the trainer's numerics: what a rollout costs.

Prints one JSON object (completion tokens per second of each, seconds per call, the ratio) and, with
--out, writes it there. Needs vLLM (``make setup-vllm`` on a CPU: run with .venv-vllm/bin/python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def qwen2_half_billion(path: Path, dtype: str) -> str:
    """A randomly initialised checkpoint of Qwen2.5-0.5B's architecture (24 layers, hidden 896, 14 query and
    2 key/value heads, MLP 4864, vocabulary 151,936, tied embeddings: ~494M parameters), built on the spot,
    with the embedded task's tokenizer beside it (prompts go in as token ids; nothing is decoded)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_align.data.embedded import build_tokenizer

    if not (path / "config.json").exists():
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            eos_token_id=1,
            pad_token_id=0,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face checkpoint directory (default: a random Llama, see --hidden)")
    p.add_argument("--qwen2-0.5b", dest="qwen", action="store_true", help="a random Qwen2.5-0.5B-shaped checkpoint")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--G", type=int, default=8)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=48,
        help="prompt + new tokens <= the checkpoint's positions (64 for the default Llama)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (set before the engine)")
    p.add_argument("--kv-cache-bytes", type=int, default=512 << 20, help="the engine's KV cache (bounded on a CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny model, 2 prompts x 2, 8 tokens")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.prompts, args.G, args.max_new_tokens, args.repeats = (
            64,
            2,
            2,
            2,
            2,
            8,
            1,
        )

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(args.threads)
    from lit_align.data import embedded
    from lit_align.rollout import generate, score_completions
    from lit_align.vllm_engine import VLLMEngine

    if args.model:
        path = args.model
    elif args.qwen:
        path = qwen2_half_billion(embedded.cache_dir() / "bench" / f"qwen2-0.5b-random-{args.dtype}", args.dtype)
    else:
        target = embedded.cache_dir() / "bench" / f"llama-h{args.hidden}-l{args.layers}-a{args.heads}"
        path = str(
            embedded._atomic_dir(target, lambda d: embedded.build_checkpoint(d, args.hidden, args.layers, args.heads))
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, min(vocab, len(tok)), (args.prompts, args.prompt_len), generator=gen).to(args.device)
    prompt_mask = torch.ones_like(prompt_ids)
    T, G = args.max_new_tokens, args.G
    settings = dict(
        max_new_tokens=T,
        min_new_tokens=T,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        pad_token_id=0,
        eos_token_id=[1],
    )

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, int]:
        fn()  # warm-up
        seconds, tokens = [], 0
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            tokens = fn()
            sync()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), tokens

    def hf() -> int:
        r = generate(model, tok, prompt_ids, prompt_mask, num_generations=G, max_new_tokens=T, min_new_tokens=T)
        return int(r.completion_mask.sum())

    hf_s, hf_tokens = timed(hf)

    build = time.perf_counter()
    engine = VLLMEngine(
        path,
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_bytes if args.device == "cpu" else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    build = time.perf_counter() - build
    engine.load_weights((n, t.detach()) for n, t in model.state_dict().items())
    seed = iter(range(10**6))

    def vllm(score: bool = False) -> int:
        ids, mask, _ = engine.generate(prompt_ids, prompt_mask, settings, G, next(seed))
        if score:
            with torch.no_grad():
                score_completions(
                    model, prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), ids, mask, 1.0
                )
        return int(mask.sum())

    vllm_s, vllm_tokens = timed(vllm)
    scored_s, _ = timed(lambda: vllm(score=True))
    sync_s = time.perf_counter()
    engine.load_weights((n, t.detach()) for n, t in model.state_dict().items())
    sync_s = time.perf_counter() - sync_s
    engine.close()
    assert hf_tokens == vllm_tokens == args.prompts * G * T, (hf_tokens, vllm_tokens)

    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    )
    import vllm as vllm_package

    result = {
        "date": str(date.today()),
        "device": device,
        "vllm": vllm_package.__version__,
        "torch": torch.__version__,
        "model": "random Qwen2.5-0.5B-shaped"
        if args.qwen
        else (args.model or f"random Llama h{args.hidden} l{args.layers}"),
        "parameters": params,
        "vocab": vocab,
        "dtype": args.dtype,
        "rows": args.prompts * G,
        "prompt_tokens": args.prompt_len,
        "new_tokens": T,
        "tokens_per_s": {"hf": hf_tokens / hf_s, "vllm": vllm_tokens / vllm_s, "vllm+score": vllm_tokens / scored_s},
        "seconds_per_call": {"hf": hf_s, "vllm": vllm_s, "vllm+score": scored_s},
        "vllm_over_hf": hf_s / vllm_s,
        "vllm+score_over_hf": hf_s / scored_s,
        "engine_build_s": build,
        "weight_sync_s": sync_s,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
