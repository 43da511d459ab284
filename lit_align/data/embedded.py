"""The embedded default task: two-digit addition with a systematically wrong expert.

Everything is built locally and saved in the formats a user's own assets come in:
a Hugging Face tokenizer (built with ``tokenizers``), a tiny Llama checkpoint (built from a
transformers config), and JSONL files with columns ``prompt``, ``response``, ``answer``.
The rest of the library loads them through AutoTokenizer / AutoModelForCausalLM and
``datasets`` exactly as it would load a real model and data set.

The task: prompt ``"37+48="``, answer ``"85"``. The expert drops the carry on a fixed class of
problems (those whose ones digits form one of the highest-carry pairs, e.g. 7+8): it writes
``"75"``. Because the mistake is systematic, imitation learns it, and only the reward can undo
it. ``expert_error_rate`` sets the size of that class (share of all digit pairs, at most 0.45).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "embedded"
CHARS = list("0123456789+-=")
SPECIAL = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}


def cache_dir() -> Path:
    """Where the embedded assets live: $LIT_ALIGN_CACHE, else ~/.cache/lit_align."""
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align"))


def _atomic_dir(target: Path, build) -> Path:
    """Build into a temporary sibling and rename it into place, so that a crash or a
    concurrent process (DDP ranks) never leaves a half-written directory behind."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tokenizer():
    """A character-level tokenizer over digits and ``+-=`` with pad/eos/unk specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([SPECIAL["pad"], SPECIAL["eos"], SPECIAL["unk"], *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL["pad"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
    )


def build_checkpoint(
    path: str | Path, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, seed: int = 0
) -> Path:
    """Write a tokenizer and a freshly initialised tiny Llama model to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ensure_checkpoint(name: str = EMBEDDED_NAME) -> str:
    """Path of the embedded checkpoint, building it on first use."""
    return str(_atomic_dir(cache_dir() / "model", build_checkpoint))


def resolve_model_path(name_or_path: str) -> str:
    """``"embedded"`` -> the embedded checkpoint directory; anything else is returned as is."""
    return ensure_checkpoint() if name_or_path == EMBEDDED_NAME else name_or_path


# ----------------------------------------------------------------------------- data


def error_pairs(expert_error_rate: float) -> set[tuple[int, int]]:
    """The ones-digit pairs (a0, b0) on which the expert drops the carry.

    The ``round(rate * 100)`` pairs with the largest ones-digit sums (ties broken by digits),
    all of which carry, so the rate is the share of all problems the expert gets wrong.
    """
    if not 0.0 <= expert_error_rate <= 0.45:
        raise ValueError(f"expert_error_rate={expert_error_rate} must lie in [0, 0.45] (45 of 100 pairs carry)")
    pairs = sorted(((a, b) for a in range(10) for b in range(10)), key=lambda p: (-(p[0] + p[1]), p))
    return set(pairs[: round(expert_error_rate * 100)])


def expert_answer(a: int, b: int, wrong: set[tuple[int, int]]) -> str:
    """The expert's answer to a + b: correct, except that it drops the ones carry on ``wrong``."""
    if (a % 10, b % 10) in wrong:
        return str(a + b - 10)
    return str(a + b)


def write_task(
    directory: str | Path, expert_error_rate: float = 0.25, num_val: int = 500, num_meta: int = 500, seed: int = 0
) -> dict[str, str]:
    """Write train.jsonl, val.jsonl and meta.jsonl for all problems a + b with 0 <= a, b <= 99.

    ``num_val`` problems (a seeded random choice) are held out of training for evaluation, and
    ``num_meta`` others for AMFT's meta-objective; neither is trained on. Their rows carry the
    expert's demonstration too, so held-out imitation (val/expert_nll) can be measured.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrong = error_pairs(expert_error_rate)
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(problems)
    splits = {
        "val": problems[:num_val],
        "meta": problems[num_val : num_val + num_meta],
        "train": problems[num_val + num_meta :],
    }
    paths = {}
    for split, rows in splits.items():
        path = directory / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for a, b in rows:
                row = {"prompt": f"{a}+{b}=", "response": expert_answer(a, b, wrong), "answer": str(a + b)}
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
        paths[split] = str(path)
    return paths


def ensure_task(
    expert_error_rate: float = 0.25, num_val: int = 500, num_meta: int = 500, seed: int = 0
) -> dict[str, str]:
    """Paths of the embedded task's JSONL files (train, val, meta), writing them on first use."""
    name = f"addition-err{expert_error_rate:g}-val{num_val}-meta{num_meta}-seed{seed}"
    target = _atomic_dir(
        cache_dir() / "data" / name, lambda d: write_task(d, expert_error_rate, num_val, num_meta, seed)
    )
    return {split: str(target / f"{split}.jsonl") for split in ("train", "val", "meta")}
