"""Peak memory of one policy update at a real vocabulary size: lit_align GRPO and CHORD against TRL's GRPOTrainer.

    python benchmarks/memory_scale.py --out benchmarks/results/memory_scale          # the full grid
    python benchmarks/memory_scale.py --sides trl --out /tmp/ms                      # TRL only
    python benchmarks/memory_scale.py --sides grpo chord --prompts 1 2 --tokens      # lit_align, small sizes
    python benchmarks/memory_scale.py --quick --vocab 2048 --out /tmp/ms             # smoke test (CI)

The checkpoint is built here, nothing is downloaded: a freshly initialised Qwen2 with Qwen2.5-0.5B's
vocabulary size (151,936) and tied embeddings, but a small body (hidden 256, 4 layers, 4 heads, 2 KV heads,
intermediate 512; about 41M parameters, 39M of them the embedding / LM head). At this shape the logits, rows x
positions x vocabulary floats, are what fills memory, as they do for the real small models. Its tokenizer has
151,936 entries too: a byte-level BPE built with ``tokenizers`` the way Qwen2's is (Qwen2's pre-tokenizer
regex, NFC, byte-level decoding; the 256 byte symbols, merges that spell the task's words, generated filler
entries, and the ChatML specials <|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS)), with Qwen2-Instruct's
ChatML chat template (default system prompt included), saved with ``save_pretrained``; AutoTokenizer loads it
as Qwen2Tokenizer, and the build checks that it encodes as built (a prompt is 35 tokens). The data: 1,000
prompts ``What is 37 + 48? Give the final answer after ####.`` with an ``answer`` column, and 256 expert
demonstrations (``prompt`` + ``response``: a worked sum, checked over and over until it is longer than the
largest max new tokens; the data module cuts it to max new tokens, so each expert row is as long as a
completion). The assets are built once into the lit_align cache ($LIT_ALIGN_CACHE/bench/memory_scale).

Every measured configuration runs in a fresh process, which does one policy update (generation of
prompts x G completions, reward, loss, backward, clip, one AdamW step):

- ``grpo``: lit_align.GRPOModule; ``chord``: lit_align.CHORDModule, token_weighting ``phi``, constant mu 0.1,
  with prompts x G / 4 expert rows (``--expert-rows``), both under a Lightning Trainer(max_steps=1) fed by
  MixedDataModule, with ``model.micro_batch_size`` = ``--micro-batch-size`` and ``model.generation_batch_size``
  = ``--generation-batch-size`` (whether the module honours them shows in the rows per forward reported);
- ``trl``: TRL's GRPOTrainer on the same checkpoint, prompts (as chat messages, so the same template and token
  ids) and reward, per_device_train_batch_size = the same micro-batch, gradient_accumulation_steps =
  steps_per_generation = prompts x G / micro-batch (one generation round, one optimizer step), beta 0,
  loss_type dapo (our token-mean), fp32, no gradient checkpointing.

Completions are forced to max new tokens on every side (``min_new_tokens``: EOS masked until then); the mean
completion length actually generated is reported. Learning rate 1e-6, temperature 1, top_p 1, top_k 0.

Reported per run: ``baseline_peak_gib``, the process's peak RSS (ru_maxrss) once the model and tokenizer are
loaded and nothing else has run; ``peak_after_generation_gib``; ``peak_gib``, its peak over the whole update
(from the parent's ``wait4``, so it is there even when the process is killed); ``update_gib`` = peak - baseline,
the update's own cost; the most rows and the most positions (rows x width) in one forward with and without
gradient (what micro-batching and generation batching bound). The parent reads the child's VmRSS every 50 ms
and kills it above ``--max-gb`` ("killed at N GiB"); once a side is killed at a size, its larger sizes (more
prompts and at least as many tokens, or more tokens and at least as many prompts) are skipped.
Writes <out>/memory_scale.json and memory_scale.md, and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("grpo", "chord", "trl")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2-Instruct's template: ChatML, with a default system message when the conversation has none
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds its pipeline with it on loading)
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
ANSWER_PREFIX = "####"
GIB = 2**30


# ----------------------------------------------------------------------------- assets
def prompt_text(a: int, b: int) -> str:
    return f"What is {a} + {b}? Give the final answer after {ANSWER_PREFIX}."


def pre_tokenizer():
    """Qwen2's pre-tokenization: its regex split, then byte-level symbols (a space is "Ġ", a newline "Ċ")."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def demonstration(a: int, b: int, min_tokens: int) -> str:
    """A worked sum, checked again and again until it is at least ``min_tokens`` tokens long (every
    pre-tokenized piece is at least one token), then the answer."""
    pieces = pre_tokenizer()
    s = a + b
    ones, carry = (a % 10 + b % 10) % 10, (a % 10 + b % 10) // 10
    text = (
        f"We add the ones: {a % 10} + {b % 10} = {a % 10 + b % 10}, so we write {ones} and carry {carry}. "
        f"Then the tens: {a // 10} + {b // 10} + {carry} = {a // 10 + b // 10 + carry}. So {a} + {b} = {s}."
    )
    k = 0
    while len(pieces.pre_tokenize_str(text)) < min_tokens:
        k += 1
        text += f" Check {k}: {s} - {b} = {a} and {s} - {a} = {b}, so the sum is right."
    return f"{text} {ANSWER_PREFIX} {s}"


def build_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` entries, built as Qwen2's is (its pre-tokenizer,
    NFC, byte-level decoding; AutoTokenizer loads it as Qwen2Tokenizer): the 256 byte symbols, merges that
    spell each pre-tokenized piece of ``texts`` (a word with its leading space, a digit, ...) left to right,
    filler entries that only a sampled completion ever contains, and the ChatML specials as the last three."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    split = pre_tokenizer()
    for text in texts:
        for piece, _ in split.pre_tokenize_str(text):
            for i in range(1, len(piece)):
                left, whole = piece[:i], piece[: i + 1]
                if whole not in vocab:
                    vocab[whole] = len(vocab)
                    merges.append((left, piece[i]))
    regular = vocab_size - len(SPECIALS)
    if len(vocab) > regular:
        raise ValueError(f"--vocab {vocab_size} is too small: the task's text alone needs {len(vocab) + 3} tokens")
    i = 0
    while len(vocab) < regular:
        vocab.setdefault(f"Ġw{i}", len(vocab))  # " w<i>"
        i += 1
    for token in SPECIALS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = split
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, padding_side="left"
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def save_qwen2(
    directory: Path, tok, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, seed: int = 0
) -> None:
    """A freshly initialised Qwen2 (tied embeddings, Qwen2.5's rope theta) of ``tok``'s vocabulary, saved with
    ``tok`` as a Hugging Face checkpoint in ``directory`` (EOS and pad from the tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def build_assets(
    directory: Path,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    prompts: int = 1000,
    demos: int = 256,
    demo_tokens: int = 1100,
    seed: int = 0,
) -> None:
    """The checkpoint (``model/``), ``prompts.jsonl`` (prompt, answer) and ``expert.jsonl`` (prompt, response)."""
    rng = random.Random(seed)
    sums = [(rng.randrange(10, 100), rng.randrange(10, 100)) for _ in range(prompts)]
    prompt_rows = [{"prompt": prompt_text(a, b), "answer": str(a + b)} for a, b in sums]
    expert_rows = [{"prompt": prompt_text(a, b), "response": demonstration(a, b, demo_tokens)} for a, b in sums[:demos]]
    texts = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n"]
    texts += [r["prompt"] for r in prompt_rows] + [r["response"] for r in expert_rows]
    tok = build_tokenizer(vocab, texts)
    save_qwen2(directory / "model", tok, hidden, layers, heads, kv_heads, intermediate, seed)
    check_tokenizer(directory / "model", tok, prompt_rows[0]["prompt"], expert_rows[0]["response"])
    for name, rows in (("prompts", prompt_rows), ("expert", expert_rows)):
        with open(directory / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def check_tokenizer(path: Path, built, prompt: str, response: str) -> None:
    """AutoTokenizer loads what was built: the same size, chat text, token ids, and text back."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path)
    chat = [{"role": "user", "content": prompt}]

    def encoded(tok) -> tuple:
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return len(tok), text, tok(text, add_special_tokens=False)["input_ids"], tok(response)["input_ids"]

    ours, theirs = encoded(built), encoded(loaded)
    if ours != theirs or loaded.decode(theirs[3]) != response:
        raise RuntimeError(f"{path}: AutoTokenizer ({type(loaded).__name__}) does not load the tokenizer as built")


def ensure_assets(a: argparse.Namespace) -> dict:
    """Build the assets once into the lit_align cache (keyed by shape); their paths."""
    from lit_align.data import embedded

    demo_tokens = max(a.tokens + [a.at_tokens]) + 64  # each demonstration is cut to max new tokens
    name = f"qwen2-v{a.vocab}-h{a.hidden}-l{a.layers}-a{a.heads}-kv{a.kv_heads}-i{a.intermediate}-demo{demo_tokens}"
    target = embedded._atomic_dir(
        embedded.cache_dir() / "bench" / "memory_scale" / name,
        lambda d: build_assets(
            d, a.vocab, a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, demo_tokens=demo_tokens
        ),
    )
    return {
        "model": str(target / "model"),
        "prompts": str(target / "prompts.jsonl"),
        "expert": str(target / "expert.jsonl"),
    }


# ----------------------------------------------------------------------------- inside a measuring process
def peak_gib() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss, KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def vmrss_gib(pid: int | str = "self") -> float:
    """Resident set size now (VmRSS of /proc/<pid>/status); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


class ForwardProbe:
    """Counts the model's forwards, with gradient (training) and without (generation), and the most rows and
    positions (rows x width) any one of them took."""

    def __init__(self, model):
        self.stats = {kind: {"forwards": 0, "max_rows": 0, "max_positions": 0} for kind in ("train", "nograd")}
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        s = self.stats["train" if torch.is_grad_enabled() else "nograd"]
        s["forwards"] += 1
        s["max_rows"] = max(s["max_rows"], int(ids.shape[0]))
        s["max_positions"] = max(s["max_positions"], int(ids.shape[0] * ids.shape[1]))


def _common(spec: dict, model) -> dict:
    import torch

    return {"parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}


def save(spec: dict, result: dict) -> None:
    """Write what is known so far: a process killed later still leaves its baseline and generation numbers."""
    path = Path(spec["result_path"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def measure_lit(spec: dict) -> dict:
    """One policy update of GRPOModule / CHORDModule under a Lightning Trainer, in this process."""
    import functools

    import lightning as L
    import torch

    from lit_align import CHORDModule, GRPOModule, MixedDataModule
    from lit_align.rewards import ExactAnswerReward
    from lit_align.weighting import ConstantMu

    P, G, T = spec["prompts"], spec["G"], spec["max_new_tokens"]
    L.seed_everything(spec["seed"], verbose=False)
    common = dict(
        model_name_or_path=spec["model"],
        num_generations=G,
        max_new_tokens=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0),
        beta=0.0,
        loss_aggregation="token-mean",
        reward=ExactAnswerReward(answer_prefix=ANSWER_PREFIX),
        micro_batch_size=spec["micro_batch_size"],
        generation_batch_size=spec["generation_batch_size"],
    )
    if spec["side"] == "grpo":
        module, expert = GRPOModule(**common), None
    else:
        module = CHORDModule(**common, mu_schedule=ConstantMu(0.1), token_weighting="phi")
        expert = spec["expert"]
    module.model.generation_config.min_new_tokens = T  # every completion max_new_tokens long
    data = MixedDataModule(
        model_name_or_path=spec["model"],
        expert_data=expert,
        prompt_data=spec["prompts_file"],
        val_data=None,
        prompt_batch_size=P,
        expert_batch_size=spec["expert_rows"] or 1,
        max_response_length=T,
        overlong="truncate",
        seed=spec["seed"],
    )
    seen: dict = {"baseline_peak_gib": peak_gib(), "rss_after_load_gib": vmrss_gib(), **_common(spec, module.model)}
    save(spec, seen)
    probe = ForwardProbe(module.model)
    tokens = []
    sample = module.sample

    def counted_sample(*args, **kwargs):
        out = sample(*args, **kwargs)
        tokens.extend(out.completion_mask.sum(-1).tolist())
        seen.update(
            peak_after_generation_gib=peak_gib(),
            mean_completion_length=sum(tokens) / len(tokens),
            completions=len(tokens),
            forwards=probe.stats,
        )
        save(spec, seen)
        return out

    module.sample = counted_sample

    class TrainStart(L.Callback):  # the fit's own set-up done (data, optimizer), the update not yet begun
        def on_train_start(self, trainer, pl_module):
            seen["peak_at_train_start_gib"] = peak_gib()
            save(spec, seen)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[TrainStart()],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seen.update(
        update_s=time.perf_counter() - start,
        peak_in_process_gib=peak_gib(),
        steps_done=trainer.global_step,
        forwards=probe.stats,
        done=True,
    )
    return seen


def measure_trl(spec: dict) -> dict:
    """One optimizer step of TRL's GRPOTrainer on the same checkpoint, data and reward, in this process."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_align.data.loading import load_table
    from lit_align.hf import load_tokenizer
    from lit_align.rewards import ExactAnswerReward

    P, G, T = spec["prompts"], spec["G"], spec["max_new_tokens"]
    rows = P * G
    micro = min(spec["micro_batch_size"] or rows, rows)
    if rows % micro:
        raise ValueError(f"prompts x G = {rows} is not a multiple of --micro-batch-size {micro}")
    accumulation = rows // micro
    reward = ExactAnswerReward(answer_prefix=ANSWER_PREFIX)

    def exact_answer(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward(["" for _ in texts], texts, answer).tolist()

    table, _ = load_table(spec["prompts_file"])
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])} for r in table]
    )
    out_dir = str(Path(spec["result_path"]).with_suffix(".trl"))  # in the parent's temporary directory
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_iterations=1,
        num_generations=G,
        max_completion_length=T,
        generation_kwargs={"min_new_tokens": T},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    torch.manual_seed(spec["seed"])
    trainer = GRPOTrainer(
        model=spec["model"],
        reward_funcs=exact_answer,
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(spec["model"]),
    )
    seen: dict = {
        "baseline_peak_gib": peak_gib(),
        "rss_after_load_gib": vmrss_gib(),
        **_common(spec, trainer.model),
        "trl_version": trl.__version__,
        "trl_per_device_train_batch_size": micro,
        "trl_gradient_accumulation_steps": accumulation,
        "trl_generation_batch_size": args.generation_batch_size,
    }
    save(spec, seen)
    probe = ForwardProbe(trainer.model)
    tokens = []
    generate = trainer._generate

    def counted_generate(*a, **k):
        result = generate(*a, **k)  # (prompt_ids, completion_ids, ...): lists, EOS kept, nothing after it
        tokens.extend(len(ids) for ids in result[1])
        seen.update(
            peak_after_generation_gib=peak_gib(),
            mean_completion_length=sum(tokens) / len(tokens),
            completions=len(tokens),
            forwards=probe.stats,
        )
        save(spec, seen)
        return result

    trainer._generate = counted_generate

    class TrainStart(TrainerCallback):  # the optimizer and data loader built, the update not yet begun
        def on_train_begin(self, args, state, control, **kwargs):
            seen["peak_at_train_start_gib"] = peak_gib()
            save(spec, seen)

    trainer.add_callback(TrainStart())
    start = time.perf_counter()
    trainer.train()
    seen.update(
        update_s=time.perf_counter() - start,
        peak_in_process_gib=peak_gib(),
        steps_done=trainer.state.global_step,
        forwards=probe.stats,
        done=True,
    )
    return seen


def measure_validation(spec: dict) -> dict:
    """One ``trainer.validate`` of lit_align's policy (what every method's validation runs: greedy answers
    and the expert NLL) over ``val_rows`` held-out rows, each a demonstration cut to ``max_new_tokens``
    tokens, greedy decoding forced to ``max_new_tokens`` too, with the default val_batch_size (100)."""
    import functools

    import lightning as L
    import torch

    from lit_align import GRPOModule, MixedDataModule
    from lit_align.rewards import ExactAnswerReward

    T = spec["max_new_tokens"]
    L.seed_everything(spec["seed"], verbose=False)
    rows = [json.loads(line) for line in Path(spec["expert"]).read_text().splitlines()][: spec["val_rows"]]
    val_file = Path(spec["result_path"]).with_suffix(".val.jsonl")
    val_file.write_text(
        "".join(json.dumps({**r, "answer": r["response"].rsplit(ANSWER_PREFIX, 1)[1].strip()}) + "\n" for r in rows)
    )
    module = GRPOModule(
        model_name_or_path=spec["model"],
        num_generations=2,
        max_new_tokens=T,  # (validation samples one answer)
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6),
        reward=ExactAnswerReward(answer_prefix=ANSWER_PREFIX),
        micro_batch_size=spec["micro_batch_size"],
        generation_batch_size=spec["generation_batch_size"],
    )
    module.model.generation_config.min_new_tokens = T  # every greedy answer max_new_tokens long
    data = MixedDataModule(
        model_name_or_path=spec["model"],
        expert_data=None,
        prompt_data=spec["prompts_file"],
        val_data=str(val_file),
        max_response_length=T,
        overlong="truncate",
        seed=spec["seed"],
    )
    seen: dict = {"baseline_peak_gib": peak_gib(), "rss_after_load_gib": vmrss_gib(), **_common(spec, module.model)}
    save(spec, seen)
    probe = ForwardProbe(module.model)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    seen.update(
        update_s=time.perf_counter() - start,
        peak_in_process_gib=peak_gib(),
        forwards=probe.stats,
        val_rows=len(rows),
        metrics={k: float(v) for k, v in metrics.items()},
        done=True,
    )
    return seen


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"] > 0:
        import torch

        torch.set_num_threads(spec["threads"])
    measure_side = {"trl": measure_trl, "val": measure_validation}.get(spec["side"], measure_lit)
    save(spec, measure_side(spec))


# ----------------------------------------------------------------------------- the parent
def run_guarded(
    cmd: list[str],
    max_gb: float,
    log_path: Path,
    env: dict | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
) -> dict:
    """Run ``cmd``, reading its VmRSS every ``poll_s`` s and killing it (SIGKILL) above ``max_gb`` GiB or after
    ``timeout_s``. Returns its exit code, whether and at what RSS it was killed, the highest RSS seen, and its
    peak RSS from ``wait4`` (the kernel's ru_maxrss of that process, also when it was killed)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    start, seen, killed_at, timed_out = time.perf_counter(), 0.0, None, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = vmrss_gib(proc.pid)
        seen = max(seen, rss)
        if killed_at is None and not timed_out:
            if rss > max_gb:
                killed_at = rss
                proc.kill()
            elif timeout_s is not None and time.perf_counter() - start > timeout_s:
                timed_out = True
                proc.kill()
        time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {
        "returncode": proc.returncode,
        "killed_at_gib": killed_at,
        "timed_out": timed_out,
        "max_vmrss_seen_gib": seen,
        "peak_gib": usage.ru_maxrss / 2**20,
        "wall_s": time.perf_counter() - start,
    }


def grid(a: argparse.Namespace) -> list[tuple[int, int]]:
    """(prompts, max new tokens): the prompts sweep at --at-tokens, then the tokens sweep at --at-prompts."""
    cells = [(p, a.at_tokens) for p in a.prompts] + [(a.at_prompts, t) for t in a.tokens]
    return sorted(dict.fromkeys(cells), key=lambda c: (c[0] * c[1], c))


def measure(side: str, prompts: int, tokens: int, a: argparse.Namespace, assets: dict, work: Path) -> dict:
    tag = f"{side}-p{prompts}-t{tokens}"
    spec = {
        "side": side,
        "prompts": prompts,
        "G": a.G,
        "max_new_tokens": tokens,
        "micro_batch_size": a.micro_batch_size,
        "generation_batch_size": a.generation_batch_size,
        "seed": a.seed,
        "threads": a.threads,
        "model": assets["model"],
        "prompts_file": assets["prompts"],
        "expert": assets["expert"],
        "expert_rows": (a.expert_rows if a.expert_rows is not None else max(1, prompts * a.G // 4))
        if side == "chord"
        else 0,
        "result_path": str(work / f"{tag}.json"),
        "val_rows": a.val_rows,
    }
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if a.threads > 0:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    log = work / f"{tag}.log"
    guard = run_guarded(
        [sys.executable, __file__, "--child", str(spec_path)],
        a.max_gb,
        log,
        env,
        a.timeout_min * 60 if a.timeout_min else None,
    )
    run = {
        k: spec[k]
        for k in ("side", "prompts", "G", "max_new_tokens", "micro_batch_size", "generation_batch_size", "expert_rows")
    }
    run.update(guard)
    result_path = Path(spec["result_path"])
    measured = json.loads(result_path.read_text()) if result_path.exists() else {}
    run.update(measured)  # all of it for a finished run; baseline (and generation) for a killed one
    if guard["killed_at_gib"] is not None:
        run["status"] = f"killed at {guard['killed_at_gib']:.1f} GiB"
    elif guard["timed_out"]:
        run["status"] = f"timed out after {a.timeout_min} min"
    elif guard["returncode"] != 0 or not measured.get("done"):
        run["status"] = f"failed (exit {guard['returncode']})"
        run["log_tail"] = log.read_text()[-3000:]
    else:
        run["status"] = "ok"
        run["update_gib"] = run["peak_gib"] - run["baseline_peak_gib"]
    return run


def covers(killed: tuple[int, int], cell: tuple[int, int]) -> bool:
    """A run at ``cell`` needs at least the memory of one killed at ``killed``."""
    return cell[0] >= killed[0] and cell[1] >= killed[1]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lit_align"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def run_header(a, assets: dict, parameters: int | None) -> dict:
    """The facts every memory benchmark's JSON starts with: date, command, machine, commit, torch version and
    the random Qwen2 checkpoint measured (``a``: the parsed --vocab / --hidden / ... flags)."""
    import torch

    return {
        "date": str(date.today()),
        "command": command_line(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
        "lit_align_commit": _git_commit(),
        "torch_version": torch.__version__,
        "model": {
            "architecture": "Qwen2ForCausalLM",
            "parameters": parameters,
            "vocab": a.vocab,
            "hidden": a.hidden,
            "layers": a.layers,
            "heads": a.heads,
            "kv_heads": a.kv_heads,
            "intermediate": a.intermediate,
            "tie_word_embeddings": True,
            "dtype": "float32",
            "path": assets["model"],
        },
    }


def command_line() -> str:
    script = Path(sys.argv[0])
    name = str(script.resolve().relative_to(ROOT)) if script.exists() else sys.argv[0]
    return "python " + " ".join([name, *sys.argv[1:]])


def _gib(x) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown(result: dict) -> str:
    m, s = result["model"], result["settings"]
    lines = [
        f"Measured {result['date']} on {result['machine']} (lit_align {result['lit_align_commit']}, TRL "
        f"{result['trl_version']}, torch {result['torch_version']}, {s['threads'] or 'default'} torch thread(s) per "
        f"process) with `{result['command']}`.",
        "",
        f"A freshly initialised Qwen2, {m['parameters'] / 1e6:.1f}M parameters: vocabulary {m['vocab']:,} "
        f"(tokenizer: {m['vocab']:,} entries, ChatML template), hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']} heads / {m['kv_heads']} KV heads, intermediate {m['intermediate']}, tied embeddings, fp32. "
        f"One policy update per fresh process: G = {s['G']}, completions forced to max new tokens "
        f"(min_new_tokens), lit_align model.micro_batch_size = {s['micro_batch_size']} and "
        f"model.generation_batch_size = {s['generation_batch_size']}, TRL per_device_train_batch_size = "
        f"min({s['micro_batch_size']}, prompts x G) with gradient accumulation over the rest (one generation "
        f"round, one optimizer step); CHORD: phi token weights, mu = 0.1, prompts x G / 4 expert rows "
        f"(each cut to max new tokens) unless --expert-rows. Peak = the process's ru_maxrss (wait4); baseline = "
        f"its peak once the model is loaded, before the update; at train start, after generation: its peak when the trainer "
        f"has set up (data, optimizer) and when the completions are sampled; update = peak - baseline. Rows / forward: the most "
        f"rows in one forward with gradient (training) and without (generation). Runs above {s['max_gb']} GiB "
        f"are killed; larger sizes of a killed side are skipped.",
    ]
    for title, cells in (
        (f"As prompts per step grow (max new tokens {s['at_tokens']})", [(p, s["at_tokens"]) for p in s["prompts"]]),
        (f"As max new tokens grow ({s['at_prompts']} prompts per step)", [(s["at_prompts"], t) for t in s["tokens"]]),
    ):
        if not cells:
            continue
        lines += [
            "",
            f"{title}:",
            "",
            "| side | prompts x G | max new tokens | mean completion length | rows / forward (training, generation) "
            "| baseline peak (GiB) | at train start | after generation | peak (GiB) | update (GiB) | update s "
            "| status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p, t in cells:
            for r in result["runs"]:
                if (r["prompts"], r["max_new_tokens"]) != (p, t):
                    continue
                expert = f" (+{r['expert_rows']} expert)" if r.get("expert_rows") else ""
                f = r.get("forwards")
                rows = f"{f['train']['max_rows']}, {f['nograd']['max_rows']}" if f else ""
                length = f"{r['mean_completion_length']:.1f}" if "mean_completion_length" in r else ""
                secs = f"{r['update_s']:.0f}" if "update_s" in r else ""
                peak = r.get("peak_gib")
                lines.append(
                    f"| {r['side']} | {p} x {r['G']}{expert} | {t} | {length} | {rows} "
                    f"| {_gib(r.get('baseline_peak_gib'))} | {_gib(r.get('peak_at_train_start_gib'))} "
                    f"| {_gib(r.get('peak_after_generation_gib'))} "
                    f"| {_gib(peak) if r['status'] == 'ok' else ''} | {_gib(r.get('update_gib'))} | {secs} "
                    f"| {r['status']} |"
                )
    return "\n".join(lines) + "\n"


def apply_quick(a: argparse.Namespace) -> None:
    a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate = 64, 2, 2, 1, 128
    a.prompts, a.tokens, a.at_prompts, a.at_tokens = [2], [8], 2, 8  # one size: 3 processes
    a.G, a.micro_batch_size, a.generation_batch_size = 4, 4, 4


def validation(a: argparse.Namespace, assets: dict) -> None:
    """--validation: one measuring process; prints its result and writes <out>/memory_scale_validation.json."""
    with tempfile.TemporaryDirectory(prefix="memory_scale-") as tmp:
        run = measure("val", a.val_rows, a.val_tokens, a, assets, Path(tmp))
    run.update(
        command=command_line(),
        date=str(date.today()),
        lit_align_commit=_git_commit(),
        vocab=a.vocab,
        hidden=a.hidden,
        layers=a.layers,
    )
    print(
        f"validation of {a.val_rows} rows x {a.val_tokens} tokens: {run['status']}, peak "
        f"{run.get('peak_gib', 0):.2f} GiB (baseline {run.get('baseline_peak_gib') or 0:.2f})",
        file=sys.stderr,
    )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "memory_scale_validation.json").write_text(json.dumps(run, indent=1) + "\n")
    print(json.dumps(run), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument(
        "--prompts",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8, 16],
        help="prompts per step of the prompts sweep (at --at-tokens)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="*",
        default=[128, 256, 512],
        help="max new tokens of the tokens sweep (at --at-prompts)",
    )
    p.add_argument("--at-tokens", type=int, default=128, help="max new tokens of the prompts sweep")
    p.add_argument("--at-prompts", type=int, default=4, help="prompts per step of the tokens sweep")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per forward/backward (both sides)")
    p.add_argument("--generation-batch-size", type=int, default=16, help="lit_align: rows decoded at once")
    p.add_argument("--expert-rows", type=int, default=None, help="CHORD's expert rows (default prompts x G / 4)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary of the model and the tokenizer")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-gb", type=float, default=10.0, help="kill a measuring process above this RSS (GiB)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="kill a measuring process after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measuring process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="measuring processes at once (the sides of one size; each still has its own peak and "
        "--max-gb, but together they may need jobs x --max-gb)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny body (hidden 64, 2 layers), 2 prompts x G 4, 8 new tokens, micro-batch 4",
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="instead of the grid: peak RSS of one validation (greedy answers + expert NLL) over "
        "--val-rows held-out rows of --val-tokens tokens, at --micro-batch-size / "
        "--generation-batch-size",
    )
    p.add_argument("--val-rows", type=int, default=100)
    p.add_argument("--val-tokens", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="write <out>/memory_scale.json and memory_scale.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child)
    if a.quick:
        apply_quick(a)

    assets = ensure_assets(a)
    if a.validation:
        return validation(a, assets)
    runs: list[dict] = []
    killed: dict[str, list[tuple[int, int]]] = {side: [] for side in a.sides}
    with tempfile.TemporaryDirectory(prefix="memory_scale-") as tmp, ThreadPoolExecutor(a.jobs) as pool:
        for cell in grid(a):  # the sides of one cell may run side by side (--jobs); cells one after another
            todo = [side for side in a.sides if not any(covers(k, cell) for k in killed[side])]
            done = dict(zip(todo, pool.map(lambda side, cell=cell: measure(side, *cell, a, assets, Path(tmp)), todo)))
            for side in a.sides:
                run = done.get(side) or {
                    "side": side,
                    "prompts": cell[0],
                    "G": a.G,
                    "max_new_tokens": cell[1],
                    "status": "skipped (killed at a smaller size)",
                }
                if run["status"].startswith(("killed", "timed out")):
                    killed[side].append(cell)
                runs.append(run)
                print(
                    f"{side} {cell[0]} prompts x {a.G}, {cell[1]} tokens: {run['status']}, peak "
                    f"{run.get('peak_gib', 0):.2f} GiB (baseline {run.get('baseline_peak_gib') or 0:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
    parameters = next((r["parameters"] for r in runs if "parameters" in r), None)
    trl_version = next((r["trl_version"] for r in runs if "trl_version" in r), None)
    if trl_version is None:
        try:
            from importlib.metadata import version

            trl_version = version("trl")
        except Exception:  # noqa: BLE001  (TRL not installed: lit_align sides only)
            trl_version = "not installed"
    result = {
        **run_header(a, assets, parameters),
        "trl_version": trl_version,
        "settings": {
            k: getattr(a, k)
            for k in (
                "sides",
                "prompts",
                "tokens",
                "at_prompts",
                "at_tokens",
                "G",
                "micro_batch_size",
                "generation_batch_size",
                "expert_rows",
                "max_gb",
                "threads",
                "seed",
                "jobs",
                "quick",
            )
        },
        "runs": runs,
    }
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "memory_scale.json").write_text(json.dumps(result, indent=1) + "\n")
        (a.out / "memory_scale.md").write_text(markdown(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
