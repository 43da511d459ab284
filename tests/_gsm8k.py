"""GSM8K-format data and a small random Qwen2 chat checkpoint (ChatML template), built in the test run.

The tokenizer and the checkpoint come from benchmarks/memory_scale.py's builders (a byte-level BPE built
as Qwen2's is, Qwen2-Instruct's ChatML template, a freshly initialised Qwen2), here with a small vocabulary
and a tiny body.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Alexis"]


def memory_scale():
    spec = importlib.util.spec_from_file_location("memory_scale", ROOT / "benchmarks" / "memory_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gsm8k_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` word problems as GSM8K publishes them: ``question``, and ``answer`` a worked solution with
    calculator annotations ending in ``#### N`` (thousands commas in N from 1,000 on)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, a, b = rng.choice(NAMES), rng.randrange(12, 99), rng.randrange(12, 99)
        kind = i % 3
        if kind == 0:
            s = a + b
            q = f"{name} sold {a} clips in April and {b} clips in May. How many clips did {name} sell altogether?"
            sol = f"{name} sold {a}+{b} = <<{a}+{b}={s}>>{s} clips altogether in April and May."
        elif kind == 1:
            s = a * b
            q = f"A farm has {a} rows of {b} apple trees. How many apple trees are there on the farm?"
            sol = f"There are {a}*{b} = <<{a}*{b}={s}>>{s} apple trees on the farm."
        else:
            s = a * b * 10
            q = f"{name} earns ${a * 10} a day and works {b} days. How much does {name} earn in dollars?"
            sol = f"{name} earns {a * 10}*{b} = $<<{a * 10}*{b}={s}>>{s} in {b} days."
        rows.append({"question": q, "answer": f"{sol}\n#### {s:,}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build_chat_checkpoint(directory: Path, texts: list[str], vocab: int = 1024, eos: str = "<|im_end|>") -> str:
    """A random Qwen2 (hidden 32, 2 layers) with a ChatML tokenizer of ``vocab`` entries whose merges spell
    ``texts``; returns the directory. ``eos``: the tokenizer's and the checkpoint's EOS, ``<|im_end|>`` as in
    Qwen instruct checkpoints, or ``<|endoftext|>`` as in Qwen base checkpoints (whose tokenizers still carry
    the ChatML template)."""
    ms = memory_scale()
    tok = ms.build_tokenizer(vocab, ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n", *texts])
    tok.eos_token = eos
    ms.save_qwen2(directory, tok, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    return str(directory)
