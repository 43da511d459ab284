"""Throughput of full RL training steps (generation + reward + loss + backward + optimizer step).

    python benchmarks/throughput.py --methods grpo chord --prompts 8 --G 8 --max-new-tokens 32 --steps 5
    python benchmarks/throughput.py --model path/to/hf_checkpoint --prompts 4 --G 16
    python benchmarks/throughput.py --quick          # smoke test: tiny model, a few steps

Each method runs in its own process (so peak memory is its own): the real GRPOModule / CHORDModule
and MixedDataModule under a Lightning Trainer, the same training_step a ``train.py fit`` run takes.
A callback times every step from the end of the previous one (so data loading and the loop's own
work count); ``sample`` (generation, log-probs at sampling time, decoding) and ``score`` (reward)
are timed inside it, and the rest of the step is "training" (forward, losses, backward, clip,
optimizer step, logging). The first ``--warmup`` steps are not timed. Prints one JSON object:
completion tokens per second, seconds per step and its split, peak RSS (and peak CUDA memory).

Without ``--model``, a freshly initialised Llama (``--hidden``, ``--layers``, ``--heads``) is built
with lit_align.data.embedded.build_checkpoint; prompts are the embedded task's two-digit sums
(all the same length, so every step has the same shapes).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("grpo", "chord")


# ----------------------------------------------------------------------------- assets
def bench_checkpoint(hidden: int = 384, layers: int = 6, heads: int = 6) -> str:
    """A freshly initialised tiny Llama + char tokenizer, built once into the lit_align cache."""
    from lit_align.data import embedded

    target = embedded.cache_dir() / "bench" / f"llama-h{hidden}-l{layers}-a{heads}"
    return str(embedded._atomic_dir(target, lambda d: embedded.build_checkpoint(d, hidden, layers, heads)))


def bench_prompts() -> str:
    """JSONL of the embedded training prompts of the form ``ab+cd=`` (all 6 tokens long)."""
    from lit_align.data import embedded

    def write(d: Path) -> None:
        rows = [json.loads(line) for line in open(embedded.ensure_task()["train"])]
        with open(d / "prompts.jsonl", "w") as f:
            for row in rows:
                if len(row["prompt"]) == 6:
                    f.write(json.dumps(row) + "\n")

    return str(embedded._atomic_dir(embedded.cache_dir() / "bench" / "prompts-6tok", write) / "prompts.jsonl")


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_memory_mib() -> dict:
    """Peak resident set size of this process (and peak CUDA memory allocated, on a GPU)."""
    import torch

    out = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "load_avg_1m": os.getloadavg()[0],  # other work on the machine during the run (CPU timings)
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def summarise_steps(steps: list[dict]) -> dict:
    """Per-step records {total, generation, scoring, tokens, prompt_tokens} -> the numbers the benchmark prints."""
    total = sum(s["total"] for s in steps)
    mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
    return {
        "completion_tokens_per_s": sum(s["tokens"] for s in steps) / total,
        "step_s": mean("total"),
        "step_s_median": statistics.median(s["total"] for s in steps),
        "generation_s": mean("generation"),
        "scoring_s": mean("scoring"),
        "training_s": mean("total") - mean("generation") - mean("scoring"),
        "completion_tokens_per_step": mean("tokens"),
        "prompt_tokens_per_step": mean("prompt_tokens"),
        "timed_steps": len(steps),
    }


# ----------------------------------------------------------------------------- FLOP accounting
def linear_parameters(model) -> int:
    """Parameters of the model's Linear layers (attention and MLP projections, LM head): the ones that
    cost 2 FLOPs per token each in a forward pass. Input embeddings are a lookup and cost none."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def head_parameters(model) -> int:
    """Parameters of the LM head (the output embedding, a Linear layer): 0 if the model has none."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.numel() if isinstance(head, torch.nn.Linear) else 0


def step_flops(model, step: dict) -> dict:
    """Model FLOPs of one step's useful work, from its token counts: 2 FLOPs per Linear parameter and
    token in a forward pass (generation: one forward per token, KV cache), 6 in forward + backward
    (training). The layers below the LM head (linear_parameters - head_parameters) run at every prompt
    and completion token of the step; the LM head only where a logit is needed, once per completion
    token (generation: the logits that sample it; training: those that score it), as both sides compute
    it (``logits_to_keep``). Padding and finished rows are not counted. Attention scores (4 x hidden x
    context per token and layer, under 1% at a few dozen tokens) are not counted."""
    n, head = linear_parameters(model), head_parameters(model)
    completion = step["completion_tokens_per_step"]
    tokens = step["prompt_tokens_per_step"] + completion
    per_forward = (n - head) * tokens + head * completion
    return {
        "linear_parameters": n,
        "head_parameters": head,
        "generation_gflop_per_step": 2 * per_forward / 1e9,
        "training_gflop_per_step": 6 * per_forward / 1e9,
    }


def matmul_gflops(model, rows: int, seconds: float = 1.0) -> float:
    """GFLOP/s of the model's own Linear matmuls, (rows x in) @ (in x out) for every Linear layer in
    turn, run back to back for ``seconds`` in this process (same threads, same machine load): what
    this device sustains on the shapes of a forward pass over ``rows`` tokens, with no framework around."""
    import torch

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    flop = 2 * rows * sum(w.numel() for w in weights)

    def sync():
        if weights[0].is_cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        for w in weights:  # warm-up
            inputs[w.shape[1]] @ w.T
        sync()
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            for w in weights:
                inputs[w.shape[1]] @ w.T
            sync()
            runs += 1
        elapsed = time.perf_counter() - start
    return flop * runs / elapsed / 1e9


def flop_accounting(model, summary: dict, rows: int) -> dict:
    """Model FLOPs per step and the rates achieved, next to the matmul rate of this process at the
    training shapes (all of a step's tokens at once) and at the decoding shapes (one token per row)."""
    flops = step_flops(model, summary)
    tokens = round(summary["prompt_tokens_per_step"] + summary["completion_tokens_per_step"])
    gen, train = flops["generation_gflop_per_step"], flops["training_gflop_per_step"]
    return {
        **flops,
        "generation_gflops": gen / summary["generation_s"],
        "training_gflops": train / summary["training_s"],
        "step_gflops": (gen + train) / summary["step_s"],
        "matmul_gflops_training_shapes": matmul_gflops(model, max(tokens, 1)),
        "matmul_gflops_decoding_shapes": matmul_gflops(model, rows),
    }


# ----------------------------------------------------------------------------- one measurement
def measure(
    method: str = "grpo",
    model: str | None = None,
    prompts: int = 8,
    G: int = 8,
    max_new_tokens: int = 32,
    steps: int = 5,
    warmup: int = 2,
    lr: float = 1e-5,
    temperature: float = 1.0,
    expert_batch_size: int | None = None,
    loss_aggregation: str = "token-mean",
    accelerator: str = "auto",
    seed: int = 0,
    ignore_eos: bool = False,
    prompt_data: str | None = None,
) -> dict:
    """Time ``steps`` training steps of ``method`` after ``warmup`` untimed ones; in this process.

    ``ignore_eos``: every completion is exactly ``max_new_tokens`` long (the sampler gets
    ``min_new_tokens = max_new_tokens``, which masks EOS until then), so the work per
    step does not depend on what the model happens to sample. ``prompt_data``: a file with a
    ``prompt`` and an ``answer`` column (default: the embedded ``ab+cd=`` sums).
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from lit_align import CHORDModule, GRPOModule, MixedDataModule
    from lit_align.weighting import ConstantMu

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {list(METHODS)}")
    if warmup < 1 or steps < 1:
        raise ValueError("warmup and steps must be >= 1 (a step is timed from the end of the one before)")
    model = model or bench_checkpoint()
    L.seed_everything(seed, verbose=False)
    common = dict(
        model_name_or_path=model,
        num_generations=G,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        beta=0.0,
        loss_aggregation=loss_aggregation,
    )
    if method == "grpo":
        module = GRPOModule(**common)
        expert = None
    else:  # CHORD-phi: both terms every step (mu = 0.1), phi token weights on the expert tokens
        module = CHORDModule(**common, mu_schedule=ConstantMu(0.1), token_weighting="phi")
        expert = "embedded"
    if ignore_eos:  # the sampler reads no checkpoint generation field: pass min_new_tokens to it directly
        import lit_align.core.sampler as policy_module

        sample_generate = policy_module.generate
        policy_module.generate = functools.partial(sample_generate, min_new_tokens=max_new_tokens)
    expert_batch_size = expert_batch_size or max(1, prompts * G // 4)  # the paper's ~20% expert share
    data = MixedDataModule(
        model_name_or_path=model,
        expert_data=expert,
        prompt_data=prompt_data or bench_prompts(),
        val_data=None,
        prompt_batch_size=prompts,
        expert_batch_size=expert_batch_size,
        seed=seed,
    )

    class StepTimer(Callback):
        def __init__(self):
            self.records: list[dict] = []
            self.current = {"generation": 0.0, "scoring": 0.0, "tokens": 0, "prompt_tokens": 0}
            self.last_end: float | None = None
            for name, phase in (("sample", "generation"), ("score", "scoring")):
                setattr(module, name, self.timed(getattr(module, name), phase))

        def timed(self, fn, phase):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                sync()
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                self.current[phase] += time.perf_counter() - start
                if phase == "generation":
                    self.current["tokens"] += int(out.completion_mask.sum())
                    self.current["prompt_tokens"] += int(out.prompt_mask.sum())
                return out

            return wrapper

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            now = time.perf_counter()
            if self.last_end is not None:
                self.records.append({"total": now - self.last_end, **self.current})
            self.current = {"generation": 0.0, "scoring": 0.0, "tokens": 0, "prompt_tokens": 0}
            self.last_end = now

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    try:
        trainer.fit(module, datamodule=data)
    finally:
        if ignore_eos:
            policy_module.generate = sample_generate
    timed = timer.records[warmup - 1 :]
    summary = summarise_steps(timed)
    memory = peak_memory_mib()  # before the matmul measurement allocates anything
    # FLOPs for GRPO only: CHORD's expert rows add training work that step_flops does not count
    flops = flop_accounting(module.model, summary, prompts * G) if method == "grpo" else {}
    return {
        "method": method,
        "model": model,
        "parameters": num_parameters(module.model),
        "prompts": prompts,
        "G": G,
        "expert_rows": expert_batch_size if expert else 0,
        "max_new_tokens": max_new_tokens,
        "ignore_eos": ignore_eos,
        "seed": seed,
        "warmup": warmup,
        "steps": steps,
        "device": str(module.device),
        "torch_threads": torch.get_num_threads(),
        **summary,
        **flops,
        **memory,
        "per_step_s": [round(r["total"], 4) for r in timed],
    }


def child_env(threads: int) -> dict:
    """The environment of a measuring process: ``threads`` intra-op threads (0: torch's default)."""
    env = os.environ.copy()
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def measure_in_subprocess(method: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh Python process (its own peak memory, its own warm-up); returns its JSON."""
    cmd = [sys.executable, __file__, "--in-process", "--methods", method, *_forwarded(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["runs"][0]


def _forwarded(a: argparse.Namespace) -> list[str]:
    out = [
        "--model",
        a.model,
        "--prompts",
        str(a.prompts),
        "--G",
        str(a.G),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--lr",
        str(a.lr),
        "--temperature",
        str(a.temperature),
        "--accelerator",
        a.accelerator,
        "--seed",
        str(a.seed),
        "--loss-aggregation",
        a.loss_aggregation,
        "--threads",
        str(a.threads),
        "--ignore-eos" if a.ignore_eos else "--no-ignore-eos",
    ]
    if a.prompt_data:
        out += ["--prompt-data", a.prompt_data]
    if a.expert_batch_size:
        out += ["--expert-batch-size", str(a.expert_batch_size)]
    return out


def add_arguments(p: argparse.ArgumentParser, ignore_eos: bool | None = False) -> None:
    """The measurement's options; ``ignore_eos`` is --ignore-eos's default (None: neither, the caller decides)."""
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: build --hidden/--layers/--heads)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument(
        "--prompt-data",
        default=None,
        help="JSONL/CSV/... with prompt and answer columns "
        "(default: the embedded task's ab+cd= sums, all 6 tokens long)",
    )
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--expert-batch-size", type=int, default=None, help="CHORD's expert rows (default prompts*G/4)")
    p.add_argument("--loss-aggregation", default="token-mean")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per measuring process (0: torch's default, one per core). One "
        "thread keeps CPU timings stable on a shared machine, where several threads per process "
        "oversubscribe the cores",
    )
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=ignore_eos,
        help="make every completion max-new-tokens long (EOS masked until then), so that both the work "
        "and the token count per step are fixed",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, 2 prompts x 4, 1+2 steps")


def apply_quick(a: argparse.Namespace) -> None:
    if a.quick:
        a.hidden, a.layers, a.heads = 64, 2, 2
        a.prompts, a.G, a.max_new_tokens, a.steps, a.warmup = 2, 4, 8, 2, 1
        a.model = None


def profiled(fn, path: Path | None, top: int = 25):
    """Run ``fn()``; with ``path``, under cProfile, writing the ``top`` functions by own time to ``path``."""
    if path is None:
        return fn()
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    result = prof.runcall(fn)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
    stats.print_stats(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {date.today()}: `{command_line()}`, cProfile, the {top} functions with the most own time\n"
        + text.getvalue()
    )
    return result


def markdown(result: dict) -> str:
    """The measurement as a markdown table, headed by its date and command."""
    r0 = result["runs"][0]
    loads = ", ".join(f"{r['load_avg_1m']:.1f}" for r in result["runs"])
    lines = [
        f"Measured {result['date']} on {r0['device']} ({r0['torch_threads']} torch threads, {r0['cpu_count']} cores, "
        f"1-min load average at the end of each run {loads}) with "
        f"`{result['command']}`; {r0['warmup']} warm-up + {r0['steps']} timed steps each"
        + ("; completions forced to max new tokens (EOS masked until then)." if r0["ignore_eos"] else "."),
        "",
        "| method | parameters | prompts x G (+ expert rows) | max new tokens | completion tokens / s | s / step "
        "| generation s | scoring s | training s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        expert = f" (+ {r['expert_rows']})" if r["expert_rows"] else ""
        cuda = f", CUDA {r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else ""
        lines.append(
            f"| {r['method']} | {r['parameters'] / 1e6:.1f}M | {r['prompts']} x {r['G']}{expert} "
            f"| {r['max_new_tokens']} | {r['completion_tokens_per_s']:.0f} | {r['step_s']:.2f} "
            f"| {r['generation_s']:.2f} | {r['scoring_s']:.3f} | {r['training_s']:.2f} "
            f"| {r['peak_rss_mib']:.0f}{cuda} |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, result: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(md)


def command_line() -> str:
    return "python " + " ".join(
        [
            str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).exists() else sys.argv[0],
            *sys.argv[1:],
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--in-process", action="store_true", help="measure in this process (default: one process each)")
    p.add_argument("--out", type=Path, default=None, help="also write <out>/throughput.json and throughput.md")
    p.add_argument("--profile", type=Path, default=None, help="with --in-process: write a cProfile summary here")
    a = p.parse_args()
    apply_quick(a)
    a.model = a.model or bench_checkpoint(a.hidden, a.layers, a.heads)
    if a.in_process:
        set_threads(a.threads)
        runs = profiled(
            lambda: [
                measure(
                    m,
                    a.model,
                    a.prompts,
                    a.G,
                    a.max_new_tokens,
                    a.steps,
                    a.warmup,
                    a.lr,
                    a.temperature,
                    a.expert_batch_size,
                    a.loss_aggregation,
                    a.accelerator,
                    a.seed,
                    a.ignore_eos,
                    a.prompt_data,
                )
                for m in a.methods
            ],
            a.profile,
        )
    else:
        runs = [measure_in_subprocess(m, a) for m in a.methods]
    result = {"date": str(date.today()), "command": command_line(), "runs": runs}
    if a.out:
        write(a.out, "throughput", result, markdown(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
