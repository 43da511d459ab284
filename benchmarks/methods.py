"""Method comparison on the embedded task: same policy-update budget, same seeds.

    python benchmarks/methods.py --seeds 0 1 2 --steps 1500 --out benchmarks/results/methods
    python benchmarks/methods.py --quick          # smoke test: 2 methods, a few steps

Each run is ``train.py fit --config configs/<method>.yaml`` in its own process; the numbers
are read back from its TensorBoard event file. Writes ``<out>/methods.md`` (a markdown table,
mean +- std over seeds), ``<out>/methods.json`` (every run) and, when matplotlib is present,
``<out>/curves.png`` (val/accuracy and train/mu against step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_align.events import read_scalars  # noqa: E402

METHODS = ["sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi", "amft", "amft_reward"]
# rows that are another config with overrides: AMFT with the paper's meta-objective (held-out reward,
# sampled) and the papers' SGD look-ahead formula (configs/amft.yaml's header points here)
VARIANTS = {
    "amft_reward": ("amft", [
        "--model.init_args.meta_objective=reward", "--model.init_args.lookahead=sgd",
        "--model.init_args.controller_lr=30", "--model.init_args.meta_interval=10",
        "--data.init_args.meta_response_column=null", "--data.init_args.meta_batch_size=64",
    ]),
}
# each mixed recipe's SFT phase as a share of the run, so --steps scales it (configs: 1500 updates)
SFT_SHARE = {
    "sft_then_grpo": ("sft_steps", 1000 / 1500),
    "chord_mu": ("sft_warmup_steps", 1000 / 1500),
    "chord_phi": ("sft_warmup_steps", 1000 / 1500),
    "amft": ("warmup_sft_steps", 1000 / 1500),
    "amft_reward": ("warmup_sft_steps", 1000 / 1500),
}


def run_one(method: str, seed: int, steps: int, val_every: int, out: Path, extra: list[str], threads: int = 1) -> dict:
    save_dir = out / "runs" / f"{method}-seed{seed}"
    config, overrides = VARIANTS.get(method, (method, []))
    args = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), *overrides,
        f"--seed_everything={seed}", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}",
        f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *extra,
    ]
    if method in SFT_SHARE:  # the plain-SFT part of the budget, as in the configs (e.g. 1000 of 1500)
        name, share = SFT_SHARE[method]
        args.append(f"--model.init_args.{name}={int(steps * share)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return collect(method, seed, save_dir, wall)


def collect(method: str, seed: int, save_dir: Path, wall: float) -> dict:
    """One run's numbers, read back from its TensorBoard event file."""
    s = read_scalars(save_dir)
    acc = s.get("val/accuracy", [])
    return {
        "method": method,
        "seed": seed,
        "final_accuracy": acc[-1][1] if acc else float("nan"),
        "best_accuracy": max(v for _, v in acc) if acc else float("nan"),
        "final_expert_nll": s["val/expert_nll"][-1][1] if "val/expert_nll" in s else float("nan"),
        # the same over the held-out demonstrations the reward accepts (where the expert is right)
        "final_expert_nll_correct": s["val/expert_nll_correct"][-1][1] if "val/expert_nll_correct" in s else float("nan"),
        "wall_s": wall,
        "accuracy_curve": acc,
        "mu_curve": s.get("train/mu", []),
        "steps": s["train/loss"][-1][0] + 1 if s.get("train/loss") else 0,  # logged every n updates
        # AMFT: dV/dmu of each meta step that fell on a logging step (log_every_n_steps; Lightning
        # repeats the latest value until the next meta step: deduplicated)
        "meta_grads": [v for i, (_, v) in enumerate(s.get("train/meta_grad", []))
                       if i == 0 or v != s["train/meta_grad"][i - 1][1]],
    }


def finished_runs(out: Path, methods: list[str], seeds: list[int], steps: int) -> list[dict]:
    """Runs of an earlier (possibly interrupted) invocation that reached ``steps`` updates; wall
    time is the one that invocation recorded in methods.json, else the span of the run's event-file
    timestamps (training and validation, not start-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    measured = {}  # the process wall times an earlier full invocation recorded, where there are any
    if (out / "methods.json").exists():
        measured = {(r["method"], r["seed"]): r["wall_s"] for r in json.loads((out / "methods.json").read_text())}
    runs = []
    for seed in seeds:
        for m in methods:
            save_dir = out / "runs" / f"{m}-seed{seed}"
            if not save_dir.exists():
                continue
            times = []
            for f in save_dir.rglob("events.out.tfevents.*"):
                acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
                acc.Reload()
                times += [e.wall_time for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
            span = max(times) - min(times) if times else float("nan")
            r = collect(m, seed, save_dir, measured.get((m, seed), span))
            if r["steps"] >= steps:
                runs.append(r)
    return runs


def summarise(runs: list[dict], methods: list[str]) -> str:
    def fmt(values: list[float], digits: int = 3) -> str:
        if len(values) < 2:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = [
        "| method | final val/accuracy | best val/accuracy | final val/expert_nll | final val/expert_nll_correct "
        "| wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            lines.append(
                f"| {m} | {fmt([r['final_accuracy'] for r in rs])} | {fmt([r['best_accuracy'] for r in rs])} "
                f"| {fmt([r['final_expert_nll'] for r in rs])} "
                f"| {fmt([r['final_expert_nll_correct'] for r in rs])} | {fmt([r['wall_s'] for r in rs], 0)} |"
            )
    meta = [(m, [r for r in runs if r["method"] == m and r.get("meta_grads")]) for m in methods]
    meta = [(m, rs) for m, rs in meta if rs]
    if meta:
        lines += [
            "",
            "Meta-gradient dV/dmu of each meta step (V: held-out loss; dV/dmu > 0 lowers mu, towards RL):",
            "",
            "| method | logged meta steps per run | mean dV/dmu | share > 0 | final mu |",
            "|---|---|---|---|---|",
        ]
        for m, rs in meta:
            means = [statistics.mean(r["meta_grads"]) for r in rs]
            shares = [sum(g > 0 for g in r["meta_grads"]) / len(r["meta_grads"]) for r in rs]
            final_mu = [r["mu_curve"][-1][1] for r in rs if r["mu_curve"]]
            lines.append(f"| {m} | {fmt([len(r['meta_grads']) for r in rs], 0)} | {fmt(means, 5)} | {fmt(shares, 2)} "
                         f"| {fmt(final_mu, 2)} |")
    return "\n".join(lines)


def plot(runs: list[dict], methods: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        for j, r in enumerate(rs):
            kw = {"color": f"C{i}", "alpha": 0.8, "label": m if j == 0 else None}
            if r["accuracy_curve"]:
                ax1.plot(*zip(*r["accuracy_curve"]), marker="o", ms=3, **kw)
            if r["mu_curve"]:
                ax2.plot(*zip(*r["mu_curve"]), **kw)
    ax1.set(xlabel="policy update", ylabel="val/accuracy", title="held-out accuracy")
    ax2.set(xlabel="policy update", ylabel="train/mu (SFT weight)", title="mu")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="policy updates per run")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 methods, 1 seed, 6 steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with --threads torch threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-runs", action="store_true",
                   help="train nothing: summarise the finished runs already under --out")
    a, extra = p.parse_known_args()  # anything else is passed to every train.py run
    if a.quick:
        a.methods, a.seeds, a.steps, a.val_every = ["sft", "chord_phi"], [0], 6, 3
        extra += ["--trainer.limit_val_batches=1", "--data.init_args.expert_batch_size=8",
                  "--data.init_args.prompt_batch_size=2", "--data.init_args.val_batch_size=20"]
    a.out.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[int, str]) -> dict:
        seed, m = job
        r = run_one(m, seed, a.steps, a.val_every, a.out, extra, a.threads)
        print(f"{m} seed {seed}: final acc {r['final_accuracy']:.3f} best {r['best_accuracy']:.3f} "
              f"expert_nll {r['final_expert_nll']:.3f} ({r['wall_s']:.0f} s)", flush=True)
        return r

    start = time.perf_counter()
    if a.from_runs:
        runs = finished_runs(a.out, a.methods, a.seeds, a.steps)
        a.seeds = sorted({r["seed"] for r in runs})
    else:
        with ThreadPoolExecutor(a.jobs) as pool:
            runs = list(pool.map(one, [(seed, m) for seed in a.seeds for m in a.methods]))
    total = time.perf_counter() - start
    table = summarise(runs, a.methods)
    earlier = a.out / "methods.md"
    first = earlier.read_text().split("\n", 1)[0] if a.from_runs and earlier.exists() else ""
    if "whole benchmark" in first:  # re-summarising a complete run: keep how it was measured
        header = f"{first} Summarised again on {date.today()} with `python benchmarks/methods.py --from-runs`.\n\n"
    else:
        if a.from_runs:
            how = (f"`python benchmarks/methods.py --from-runs --out {a.out}`, summarising the runs that had "
                   f"finished (wall time: span of each run's event file, training and validation only)")
        else:
            how = (f"`{' '.join(['python benchmarks/methods.py', *sys.argv[1:]])}` "
                   f"({a.jobs} runs at once, {a.threads} torch thread each; whole benchmark {total / 60:.1f} min)")
        header = (f"Embedded addition task, default noisy expert (25% systematic carry errors); {a.steps} policy "
                  f"updates per run; seeds {a.seeds}; {date.today()}; {how}.\n\n")
    (a.out / "methods.md").write_text(header + table + "\n")
    (a.out / "methods.json").write_text(json.dumps(runs, indent=1))
    plotted = plot(runs, a.methods, a.out / "curves.png")
    print(table)
    print(f"wrote {a.out / 'methods.md'}" + (f" and {a.out / 'curves.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
