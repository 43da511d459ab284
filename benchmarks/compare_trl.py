"""Our GRPO against TRL's GRPOTrainer: completion tokens per second on the same model and settings.

    python benchmarks/compare_trl.py --rounds 3 --prompts 8 --G 8 --max-new-tokens 32 --steps 5
    python benchmarks/compare_trl.py --quick        # smoke test: tiny model, 1 round, a few steps

Both sides train the same local checkpoint (a freshly initialised Llama built by
lit_align.data.embedded.build_checkpoint; about 10.7M parameters by default) on the same prompts
(the embedded task's ``ab+cd=`` sums) with the same reward (lit_align's ExactAnswerReward), G,
max_new_tokens, temperature, top_p = 1, top_k = 0, learning rate (AdamW, no weight decay, constant),
gradient clipping at 1.0, beta = 0 (no reference model), token-mean loss (TRL: loss_type="dapo"),
fp32 and no gradient checkpointing (TRL's defaults bf16=True and gradient_checkpointing=True are
turned off so both do the same arithmetic), one update per generation batch, one process, the
same number of torch threads (``--threads``, 1 by default).
By default every completion is exactly max_new_tokens long (``min_new_tokens`` masks EOS on both
sides): otherwise the two sides sample different lengths from their own random streams, and the
tokens-per-second ratio measures those lengths as much as the code (``--no-ignore-eos`` to see it).
Runs alternate, ours, TRL, ours, TRL, ..., each in a fresh process; a step is timed from the end of
the previous one (warm-up steps untimed) and the ratio of tokens per second, ours / TRL's, is taken
within each round (so is TRL's seconds per step / ours). Prints one JSON object with min / median /
max of the ratios and every run.
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
    current = {"generation": 0.0, "scoring": 0.0, "tokens": 0}
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
            current = {"generation": 0.0, "scoring": 0.0, "tokens": 0}
            last_end.append(now)

    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=a.model, reward_funcs=exact_answer, args=trl_config(a, out), train_dataset=dataset,
            processing_class=load_tokenizer(a.model), callbacks=[StepTimer()],
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
                return result

            return wrapper

        trainer._generate = timed(trainer._generate, "generation")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "scoring")
        trainer.train()
    timed_records = records[a.warmup - 1:]
    return {
        "method": "trl_grpo",
        "trl_version": trl.__version__,
        "model": a.model,
        "parameters": throughput.num_parameters(trainer.model),
        "prompts": a.prompts,
        "G": a.G,
        "max_new_tokens": a.max_new_tokens,
        "ignore_eos": a.ignore_eos,
        "warmup": a.warmup,
        "steps": a.steps,
        "device": str(trainer.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        **throughput.summarise_steps(timed_records),
        **throughput.peak_memory_mib(),
        "per_step_s": [round(r["total"], 4) for r in timed_records],
    }


def markdown(result: dict) -> str:
    r0, ratio, steps = result["runs"][0], result["ratio_tokens_per_s"], result["ratio_step_time_trl_over_ours"]
    loads = [x["load_avg_1m"] for x in result["runs"]]
    lines = [
        f"lit_align GRPO vs TRL {result['trl_version']} GRPOTrainer, measured {result['date']} on {r0['device']} "
        f"({r0['torch_threads']} torch thread(s) per process, {r0['cpu_count']} cores; 1-min load average at the end "
        f"of the runs {min(loads):.1f} to {max(loads):.1f}) "
        f"with `{result['command']}`: a {result['parameters'] / 1e6:.1f}M-parameter "
        f"Llama, {r0['prompts']} prompts x G = {r0['G']}, {r0['max_new_tokens']} new tokens, {r0['warmup']} warm-up + "
        f"{r0['steps']} timed steps per run, {len(ratio['per_round'])} rounds (ours, TRL, ours, TRL, ...)"
        + (", every completion exactly max new tokens long (EOS masked until then)." if r0["ignore_eos"] else "."),
        "",
        "| ratio per round | min | median | max |",
        "|---|---|---|---|",
        f"| completion tokens / s, ours / TRL | {ratio['min']:.2f} | {ratio['median']:.2f} | {ratio['max']:.2f} |",
        f"| s / step, TRL / ours | {steps['min']:.2f} | {steps['median']:.2f} | {steps['max']:.2f} |",
        "",
        "| median over rounds | completion tokens / s | s / step | generation s | scoring s | training s "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["median"].items():
        lines.append(
            f"| {'lit_align' if name == 'ours' else 'TRL'} | {m['completion_tokens_per_s']:.0f} | {m['step_s']:.2f} "
            f"| {m['generation_s']:.2f} | {m['scoring_s']:.3f} | {m['training_s']:.2f} | {m['peak_rss_mib']:.0f} |"
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
    throughput.add_arguments(p, ignore_eos=True)
    p.add_argument("--rounds", type=int, default=3, help="pairs of runs (ours, TRL)")
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
    runs, ratios, step_ratios = [], [], []
    for r in range(a.rounds):
        ours = run_child("ours", a)
        theirs = run_child("trl", a)
        runs += [dict(ours, round=r), dict(theirs, round=r)]
        ratios.append(ours["completion_tokens_per_s"] / theirs["completion_tokens_per_s"])
        step_ratios.append(theirs["step_s"] / ours["step_s"])
        print(f"round {r}: ours {ours['completion_tokens_per_s']:.1f} tok/s, "
              f"TRL {theirs['completion_tokens_per_s']:.1f} tok/s, ratio {ratios[-1]:.2f}", file=sys.stderr, flush=True)
    side = lambda name: [x for x in runs if (x["method"] == "grpo") == (name == "ours")]  # noqa: E731
    summary = {
        name: {key: statistics.median(x[key] for x in side(name)) for key in
               ("completion_tokens_per_s", "step_s", "generation_s", "scoring_s", "training_s", "peak_rss_mib")}
        for name in ("ours", "trl")
    }
    result = {
        "date": str(date.today()),
        "command": throughput.command_line(),
        "trl_version": runs[1]["trl_version"],
        "parameters": runs[0]["parameters"],
        "ratio_tokens_per_s": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                               "per_round": ratios},
        "ratio_step_time_trl_over_ours": {"min": min(step_ratios), "median": statistics.median(step_ratios),
                                          "max": max(step_ratios), "per_round": step_ratios},
        "median": summary,
        "runs": runs,
    }
    if a.out:
        throughput.write(a.out, "compare_trl", result, markdown(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
