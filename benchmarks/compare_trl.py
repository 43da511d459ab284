"""Our GRPO against TRL's GRPOTrainer: completion tokens per second on the same model and settings.

    python benchmarks/compare_trl.py --rounds 5 --out benchmarks/results   # both completion-length modes
    python benchmarks/compare_trl.py --no-ignore-eos --rounds 3            # free-length completions only
    python benchmarks/compare_trl.py --quick        # smoke test: tiny model, 1 round, a few steps

Both sides train the same local checkpoint (a freshly initialised Llama built by
lit_align.data.embedded.build_checkpoint; 14.2M parameters by default) on the same prompts
(the embedded task's ``ab+cd=`` sums) with the same reward (lit_align's ExactAnswerReward), G,
max_new_tokens, temperature, top_p = 1, top_k = 0, learning rate (AdamW, no weight decay, constant),
gradient clipping at 1.0, beta = 0 (no reference model), token-mean loss (TRL: loss_type="dapo"),
fp32 and no gradient checkpointing (TRL's defaults bf16=True and gradient_checkpointing=True are
turned off so both do the same arithmetic), one update per generation batch, one process, the
same number of torch threads (``--threads``, 1 by default).

Two completion-length modes (``--lengths``, both by default; ``--ignore-eos`` / ``--no-ignore-eos``
pick one): ``fixed``, every completion exactly max_new_tokens long (``min_new_tokens`` masks EOS on
both sides), so both do the same work per step; ``free``, completions end at the EOS the model
samples, as in real training. There the two sides sample different lengths from their own random
streams, so each side's completion tokens per step are reported next to the ratio, and round r
uses seed ``--seed + r`` on both sides (so the gap between the two sides' lengths is chance, not
the same in every round).
Runs alternate, ours, TRL, ours, TRL, ..., each in a fresh process; a step is timed from the end of
the previous one (warm-up steps untimed) and the ratio of tokens per second, ours / TRL's, is taken
within each round (so is TRL's seconds per step / ours).

Each run also accounts for its FLOPs (throughput.flop_accounting): the model FLOPs of the step's
tokens (generation 2 N, training 6 N per token; the LM head's N only at completion tokens, where
logits are needed), the rates achieved, and the rate of the model's own
matmuls alone in the same process. From TRL's runs comes the ceiling: the step's model FLOPs at that
matmul rate, i.e. the time no implementation of the same math can beat on this machine.
Prints one JSON object with the ratios per mode, the medians, the ceilings and every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402


def trl_config(a: argparse.Namespace, output_dir: str):
    """TRL's GRPOConfig matching ``throughput.measure``'s GRPO settings."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=a.prompts * a.G,  # TRL counts completions, we count prompts
        num_generations=a.G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=a.max_new_tokens,
        generation_kwargs={"min_new_tokens": a.max_new_tokens} if a.ignore_eos else None,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",  # token-level normalisation over the batch = our token-mean
        scale_rewards="group",  # (r - mean) / std within each group, as our advantage_norm="std"
        max_steps=a.warmup + a.steps,
        logging_steps=1,  # ours logs every step too
        report_to="none",
        save_strategy="no",
        use_cpu=a.accelerator == "cpu" or not _cuda(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=a.seed,
        dataloader_num_workers=0,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure_trl(a: argparse.Namespace) -> dict:
    """TRL's GRPOTrainer on ``a.model``, timed like ``throughput.measure``; in this process."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from lit_align.data.loading import load_table
    from lit_align.hf import load_tokenizer
    from lit_align.rewards import ExactAnswerReward

    reward = ExactAnswerReward()

    def exact_answer(prompts, completions, answer, **kwargs):
        return reward(prompts, completions, answer).tolist()

    rows, _ = load_table(a.prompt_data or throughput.bench_prompts())  # what MixedDataModule reads
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])
    records: list[dict] = []
    current = {"generation": 0.0, "scoring": 0.0, "tokens": 0, "prompt_tokens": 0}
    last_end: list[float] = []

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            nonlocal current
            sync()
            now = time.perf_counter()
            if last_end:
                records.append({"total": now - last_end[-1], **current})
            current = {"generation": 0.0, "scoring": 0.0, "tokens": 0, "prompt_tokens": 0}
            last_end.append(now)

    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=a.model,
            reward_funcs=exact_answer,
            args=trl_config(a, out),
            train_dataset=dataset,
            processing_class=load_tokenizer(a.model),
            callbacks=[StepTimer()],
        )

        def timed(fn, phase):
            def wrapper(*args, **kwargs):
                sync()
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                sync()
                current[phase] += time.perf_counter() - start
                if phase == "generation":  # (prompt_ids, completion_ids, ...): EOS kept, nothing after it
                    current["tokens"] += sum(len(ids) for ids in result[1])
                    current["prompt_tokens"] += sum(len(ids) for ids in result[0])
                return result

            return wrapper

        trainer._generate = timed(trainer._generate, "generation")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "scoring")
        trainer.train()
    timed_records = records[a.warmup - 1 :]
    summary = throughput.summarise_steps(timed_records)
    memory = throughput.peak_memory_mib()
    return {
        "method": "trl_grpo",
        "trl_version": trl.__version__,
        "model": a.model,
        "parameters": throughput.num_parameters(trainer.model),
        "prompts": a.prompts,
        "G": a.G,
        "max_new_tokens": a.max_new_tokens,
        "ignore_eos": a.ignore_eos,
        "seed": a.seed,
        "warmup": a.warmup,
        "steps": a.steps,
        "device": str(trainer.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        **summary,
        **throughput.flop_accounting(trainer.model, summary, a.prompts * a.G),
        **memory,
        "per_step_s": [round(r["total"], 4) for r in timed_records],
    }


def summarise_mode(runs: list[dict]) -> dict:
    """The rounds of one length mode: ratios per round, medians per side, TRL's FLOP ceiling."""
    ours = [r for r in runs if r["method"] == "grpo"]
    trl = [r for r in runs if r["method"] == "trl_grpo"]
    ratios = [o["completion_tokens_per_s"] / t["completion_tokens_per_s"] for o, t in zip(ours, trl)]
    step_ratios = [t["step_s"] / o["step_s"] for o, t in zip(ours, trl)]
    keys = (
        "completion_tokens_per_s",
        "step_s",
        "generation_s",
        "scoring_s",
        "training_s",
        "peak_rss_mib",
        "completion_tokens_per_step",
        "prompt_tokens_per_step",
        "generation_gflop_per_step",
        "training_gflop_per_step",
        "generation_gflops",
        "training_gflops",
        "step_gflops",
        "matmul_gflops_training_shapes",
        "matmul_gflops_decoding_shapes",
        "load_avg_1m",
    )
    median = {
        name: {k: statistics.median(x[k] for x in side) for k in keys} for name, side in (("ours", ours), ("trl", trl))
    }
    # TRL's step: its model FLOPs at this machine's matmul rates, generation at the decoding shapes
    floors = [
        t["generation_gflop_per_step"] / t["matmul_gflops_decoding_shapes"]
        + t["training_gflop_per_step"] / t["matmul_gflops_training_shapes"]
        for t in trl
    ]
    spread = lambda v: {"min": min(v), "median": statistics.median(v), "max": max(v), "per_round": v}  # noqa: E731
    return {
        "ratio_tokens_per_s": spread(ratios),
        "ratio_step_time_trl_over_ours": spread(step_ratios),
        "median": median,
        "trl_step_at_matmul_rate_s": statistics.median(floors),
        "max_speedup_over_trl": statistics.median(t["step_s"] / f for t, f in zip(trl, floors)),
    }


def _count(n: int) -> str:
    """A parameter count for the text: 14.2M, 6.1k."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def markdown(result: dict) -> str:
    modes, r0 = result["lengths"], result["runs"][0]
    loads = [x["load_avg_1m"] for x in result["runs"]]
    name = {"fixed": "fixed-length", "free": "free-length"}
    lines = [
        f"lit_align GRPO vs TRL {result['trl_version']} GRPOTrainer, measured {result['date']} on {r0['device']} "
        f"({r0['torch_threads']} torch thread(s) per process, {r0['cpu_count']} cores; 1-min load average at the end "
        f"of the runs {min(loads):.1f} to {max(loads):.1f}) with `{result['command']}`: a "
        f"{result['parameters'] / 1e6:.1f}M-parameter Llama, {r0['prompts']} prompts x G = {r0['G']}, up to "
        f"{r0['max_new_tokens']} new tokens, {r0['warmup']} warm-up + {r0['steps']} timed steps per run, "
        f"{result['rounds']} round(s) (ours, TRL, ours, TRL, ...) per mode. Fixed-length: every completion exactly "
        f"max new tokens long (EOS masked until then), the same work on both sides. Free-length: completions end "
        f"at the EOS the model samples; round r uses seed {r0['seed']} + r on both sides.",
        "",
        "| ratio per round, ours / TRL | " + " | ".join(f"{name[m]}: min | median | max" for m in modes) + " |",
        "|---|" + "---|---|---|" * len(modes),
    ]
    for label, key in (
        ("completion tokens / s", "ratio_tokens_per_s"),
        ("s / step (TRL / ours)", "ratio_step_time_trl_over_ours"),
    ):
        cells = " | ".join(
            f"{modes[m][key]['min']:.2f} | {modes[m][key]['median']:.2f} | {modes[m][key]['max']:.2f}" for m in modes
        )
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "| median over rounds | completion tokens / step | completion tokens / s | s / step | generation s "
        "| training s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    # one row per mode and side ("fixed-length, lit_align", ...), with that side's median numbers
    rows = [
        (f"{name[m]}, {'lit_align' if side == 'ours' else 'TRL'}", x)
        for m, mode in modes.items()
        for side, x in mode["median"].items()
    ]
    for label, x in rows:
        lines.append(
            f"| {label} | {x['completion_tokens_per_step']:.0f} "
            f"| {x['completion_tokens_per_s']:.0f} | {x['step_s']:.2f} | {x['generation_s']:.2f} "
            f"| {x['training_s']:.2f} | {x['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Where the time goes: model FLOPs of each step's tokens (generation 2 N, forward + backward 6 N per "
        f"prompt or completion token, N = {_count(r0['linear_parameters'] - r0['head_parameters'])} parameters "
        f"in the Linear layers below the LM head, plus the LM head's {_count(r0['head_parameters'])} only where "
        "a logit is needed, once per completion token, as both sides compute it; padding and finished rows not "
        "counted), the rate achieved, and the rate of the model's own matmuls "
        "alone, back to back in the same process (at the decoding shapes, one token per row, and at the "
        "training shapes, all of the step's tokens).",
        "",
        "| median over rounds | model GFLOP / step (generation + training) | generation GFLOP/s "
        "| training GFLOP/s | matmul alone GFLOP/s (decoding / training shapes) |",
        "|---|---|---|---|---|",
    ]
    for label, x in rows:
        dec, tr = x["matmul_gflops_decoding_shapes"], x["matmul_gflops_training_shapes"]
        lines.append(
            f"| {label} | {x['generation_gflop_per_step']:.1f} + {x['training_gflop_per_step']:.1f} "
            f"| {x['generation_gflops']:.0f} ({x['generation_gflops'] / dec:.0%}) "
            f"| {x['training_gflops']:.0f} ({x['training_gflops'] / tr:.0%}) | {dec:.0f} / {tr:.0f} |"
        )
    lines.append("")
    for m, mode in modes.items():
        trl = mode["median"]["trl"]
        lines.append(
            f"- {name[m]}: TRL's step ({trl['step_s']:.2f} s) holds {trl['generation_gflop_per_step'] + trl['training_gflop_per_step']:.0f} "
            f"GFLOP of model work, which takes {mode['trl_step_at_matmul_rate_s']:.2f} s at the matmul rates above: "
            f"no implementation of the same math can be more than {mode['max_speedup_over_trl']:.2f}x faster than TRL "
            f"here (measured: {mode['ratio_tokens_per_s']['median']:.2f}x in tokens/s)."
        )
    return "\n".join(lines) + "\n"


def run_child(side: str, a: argparse.Namespace) -> dict:
    if side == "ours":
        return throughput.measure_in_subprocess("grpo", a)
    cmd = [sys.executable, __file__, "--trl-child", *throughput._forwarded(a)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=throughput.child_env(a.threads))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_arguments(p, ignore_eos=None)
    p.add_argument(
        "--lengths",
        nargs="+",
        choices=("fixed", "free"),
        default=None,
        help="completion-length modes to measure (default: both; --ignore-eos alone: fixed, "
        "--no-ignore-eos alone: free)",
    )
    p.add_argument("--rounds", type=int, default=3, help="pairs of runs (ours, TRL) per mode")
    p.add_argument("--trl-child", action="store_true", help="measure TRL only, in this process")
    p.add_argument("--profile", type=Path, default=None, help="with --trl-child: write a cProfile summary here")
    p.add_argument("--out", type=Path, default=None, help="also write <out>/compare_trl.json and compare_trl.md")
    a = p.parse_args()
    if a.quick:
        throughput.apply_quick(a)
        a.rounds = 1
    a.model = a.model or throughput.bench_checkpoint(a.hidden, a.layers, a.heads)
    if a.trl_child:
        throughput.set_threads(a.threads)
        print(json.dumps(throughput.profiled(lambda: measure_trl(a), a.profile)), flush=True)
        return
    lengths = a.lengths or {True: ["fixed"], False: ["free"], None: ["fixed", "free"]}[a.ignore_eos]
    runs: list[dict] = []
    for r in range(a.rounds):
        for mode in lengths:
            # a fresh seed per round, the same on both sides: in free-length mode each side's completion
            # lengths then differ from the other's by chance, not by the same amount in every round
            mode_args = argparse.Namespace(**{**vars(a), "ignore_eos": mode == "fixed", "seed": a.seed + r})
            ours, theirs = run_child("ours", mode_args), run_child("trl", mode_args)
            runs += [dict(ours, round=r, lengths=mode), dict(theirs, round=r, lengths=mode)]
            print(
                f"round {r}, {mode} lengths: ours {ours['completion_tokens_per_s']:.1f} tok/s "
                f"({ours['completion_tokens_per_step']:.0f} tok/step), TRL {theirs['completion_tokens_per_s']:.1f} "
                f"tok/s ({theirs['completion_tokens_per_step']:.0f} tok/step)",
                file=sys.stderr,
                flush=True,
            )
    result = {
        "date": str(date.today()),
        "command": throughput.command_line(),
        "trl_version": runs[1]["trl_version"],
        "parameters": runs[0]["parameters"],
        "rounds": a.rounds,
        "lengths": {mode: summarise_mode([x for x in runs if x["lengths"] == mode]) for mode in lengths},
        "runs": runs,
    }
    if a.out:
        throughput.write(a.out, "compare_trl", result, markdown(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
