"""Method comparison on the embedded task: same policy-update budget, same seeds, three axes.

    python benchmarks/methods.py --seeds 0 1 2 --steps 400 --val-every 100 --out benchmarks/results/methods
    python benchmarks/methods.py --quick          # smoke test: 2 methods, a few steps

Every run starts from the multi-skill base checkpoint (``--start base``, the default: the embedded
model pre-trained on subtraction, digit reversal and carry-free addition, built and cached on first
use) or from the freshly initialised model (``--start scratch``). Each run is
``train.py fit --config configs/<method>.yaml`` in its own process; the numbers are read back from its
TensorBoard event file, and the starting checkpoint is measured once with ``train.py validate``.
Axes, per method (mean +- std over seeds): in-domain accuracy (val/accuracy) after 25%, 50% and 100%
of the update budget; retention (val/retention/<skill>, greedy accuracy on held-out problems of the
skills the post-training data never shows) and its drop from the starting checkpoint; the held-out
expert NLL on the demonstrations the reward accepts (val/expert_nll_correct).
Writes ``<out>/methods.md`` (the tables, and the pairs of methods that differ by more than two seed
standard deviations on an axis), ``<out>/methods.json`` (every run) and, when matplotlib is present,
``<out>/curves.png`` (the three axes and train/mu).
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

from lit_align.data import embedded  # noqa: E402
from lit_align.events import read_scalars  # noqa: E402

BUDGET_POINTS = (25, 50, 100)  # per cent of the update budget at which val/accuracy is reported
BASE_LR = 3e-4  # from the base checkpoint, every method's peak lr (see README, Results)
BASE_SFT_SHARE = 1 / 3  # from the base checkpoint: SFT-then-GRPO's SFT stage (see README, Results)
DEFAULT_ERROR_RATE = 0.40  # the expert's systematic-error class (data.expert_error_rate; README, Results)
METHODS = ["sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi", "amft", "amft_reward"]
DEFAULT_METHODS = METHODS[:-1]  # amft_reward (the paper's meta-objective) on request: it keeps the run within an hour
# rows that are another config with overrides: AMFT with the paper's meta-objective (held-out reward,
# sampled) and the papers' SGD look-ahead formula (configs/amft.yaml's header points here)
VARIANTS = {
    "amft_reward": (
        "amft",
        [
            "--model.init_args.meta_objective=reward",
            "--model.init_args.lookahead=sgd",
            "--model.init_args.controller_lr=30",
            "--model.init_args.meta_interval=10",
            "--data.init_args.meta_response_column=null",
            "--data.init_args.meta_batch_size=64",
        ],
    ),
}
# each mixed recipe's SFT phase as a share of the run, so --steps scales it (configs: 1500 updates);
# from the base checkpoint (--start base) the shares in SFT_SHARE_BASE
SFT_SHARE = {
    "sft_then_grpo": ("sft_steps", 1000 / 1500),
    "chord_mu": ("sft_warmup_steps", 1000 / 1500),
    "chord_phi": ("sft_warmup_steps", 1000 / 1500),
    "amft": ("warmup_sft_steps", 1000 / 1500),
    "amft_reward": ("warmup_sft_steps", 1000 / 1500),
}
# from the base checkpoint, each recipe as its paper runs it from an instruct model: SFT-then-GRPO's SFT stage
# a third of the run; CHORD-mu and CHORD-phi with no SFT warm-up (mu's schedule from update 0); AMFT with
# its paper's 50-update warm-up (per 1500 updates)
SFT_SHARE_BASE = {
    "sft_then_grpo": ("sft_steps", BASE_SFT_SHARE),
    "chord_mu": ("sft_warmup_steps", 0.0),
    "chord_phi": ("sft_warmup_steps", 0.0),
    "amft": ("warmup_sft_steps", 50 / 1500),
    "amft_reward": ("warmup_sft_steps", 50 / 1500),
}


def start_args(start: str, error_rate: float) -> list[str]:
    """train.py arguments every run (and the starting checkpoint's evaluation) gets; from the base checkpoint
    every method's peak learning rate is BASE_LR."""
    model = embedded.BASE_NAME if start == "base" else embedded.EMBEDDED_NAME
    args = [
        f"--model.init_args.model_name_or_path={model}",
        f"--data.init_args.expert_error_rate={error_rate}",
        "--data.init_args.retention_data=embedded",
    ]
    return args + ([f"--model.init_args.optimizer.init_args.lr={BASE_LR}"] if start == "base" else [])


def evaluate_start(start: str, error_rate: float, out: Path, extra: list[str], threads: int = 1) -> dict:
    """The starting checkpoint's held-out numbers (val/accuracy, val/retention/<skill>, ...), from
    ``train.py validate`` (which also builds the base checkpoint on first use)."""
    save_dir = out / "runs" / f"start-{start}"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "validate",
        "--config",
        str(ROOT / "configs" / "sft.yaml"),
        *start_args(start, error_rate),
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"validating the {start} checkpoint failed:\n{proc.stderr[-3000:]}")
    return {k: v[-1][1] for k, v in read_scalars(save_dir).items() if k.startswith("val/")}


def run_one(
    method: str,
    seed: int,
    steps: int,
    val_every: int,
    out: Path,
    extra: list[str],
    threads: int = 1,
    start: str = "base",
    error_rate: float = 0.25,
) -> dict:
    save_dir = out / "runs" / f"{method}-seed{seed}"
    config, overrides = VARIANTS.get(method, (method, []))
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        *overrides,
        f"--seed_everything={seed}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={val_every}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *start_args(start, error_rate),
        *extra,
    ]
    shares = SFT_SHARE_BASE if start == "base" else SFT_SHARE
    if method in shares:  # the plain-SFT part of the budget (from scratch as in the configs, 1000 of 1500)
        name, share = shares[method]
        args.append(f"--model.init_args.{name}={int(steps * share)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return collect(method, seed, save_dir, wall, steps)


def at_budget(curve: list[tuple[int, float]], step: int) -> float:
    """The value logged after ``step`` policy updates (Lightning logs validation after update k at step
    k - 1); NaN when the curve has no such point."""
    return next((v for s, v in curve if s == step - 1), float("nan"))


def collect(method: str, seed: int, save_dir: Path, wall: float, budget: int) -> dict:
    """One run's numbers, read back from its TensorBoard event file; ``budget`` is its update budget."""
    s = read_scalars(save_dir)
    acc = s.get("val/accuracy", [])
    retention = {k.removeprefix("val/retention/"): v for k, v in s.items() if k.startswith("val/retention/")}
    return {
        "method": method,
        "seed": seed,
        "final_accuracy": acc[-1][1] if acc else float("nan"),
        # sample efficiency: val/accuracy after a quarter, half and all of the update budget
        "accuracy_at": {f"{q}%": at_budget(acc, budget * q // 100) for q in BUDGET_POINTS},
        "final_retention": {k: v[-1][1] for k, v in retention.items()},
        "retention_curves": retention,
        "best_accuracy": max(v for _, v in acc) if acc else float("nan"),
        "final_expert_nll": s["val/expert_nll"][-1][1] if "val/expert_nll" in s else float("nan"),
        # the same over the held-out demonstrations the reward accepts (where the expert is right)
        "final_expert_nll_correct": s["val/expert_nll_correct"][-1][1]
        if "val/expert_nll_correct" in s
        else float("nan"),
        "wall_s": wall,
        "accuracy_curve": acc,
        "mu_curve": s.get("train/mu", []),
        "steps": s["train/loss"][-1][0] + 1 if s.get("train/loss") else 0,  # logged every n updates
        # AMFT: dV/dmu of each meta step that fell on a logging step (log_every_n_steps; Lightning
        # repeats the latest value until the next meta step: deduplicated)
        "meta_grads": [
            v for i, (_, v) in enumerate(s.get("train/meta_grad", [])) if i == 0 or v != s["train/meta_grad"][i - 1][1]
        ],
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
            r = collect(m, seed, save_dir, measured.get((m, seed), span), steps)
            if r["steps"] >= steps:
                runs.append(r)
    return runs


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def axes(runs: list[dict], start: dict) -> dict[str, callable]:
    """Axis name -> a function of one run giving its value: the accuracy points, retention per skill and
    its drop from the starting checkpoint (start - final: positive is forgetting), the expert NLL."""
    skills = sorted({k for r in runs for k in r.get("final_retention", {})})
    out = {f"val/accuracy @{q}%": (lambda r, q=q: r["accuracy_at"][f"{q}%"]) for q in BUDGET_POINTS}
    for k in skills:
        out[f"val/retention/{k}"] = lambda r, k=k: r["final_retention"].get(k, float("nan"))
        base = start.get(f"val/retention/{k}", float("nan"))
        out[f"drop {k}"] = lambda r, k=k, base=base: base - r["final_retention"].get(k, float("nan"))
    out["val/expert_nll_correct"] = lambda r: r["final_expert_nll_correct"]
    return out


def separated(runs: list[dict], methods: list[str], start: dict) -> list[str]:
    """Pairs of methods whose seed means on an axis differ by more than two seed standard deviations (the
    larger of the two methods' standard deviations), one line each, by axis."""
    lines = []
    for name, value in axes(runs, start).items():
        if name.startswith("drop "):
            continue  # the same separation as the retention itself
        stats = {}
        for m in methods:
            vals = [value(r) for r in runs if r["method"] == m]
            vals = [v for v in vals if v == v]
            if len(vals) >= 2:
                stats[m] = (statistics.mean(vals), statistics.stdev(vals))
        for i, m1 in enumerate(methods):
            for m2 in methods[i + 1 :]:
                if m1 in stats and m2 in stats:
                    (a, sa), (b, sb) = stats[m1], stats[m2]
                    if abs(a - b) > 2 * max(sa, sb):
                        lines.append(
                            f"- {name}: {m1} {a:.3f} vs {m2} {b:.3f} (|diff| {abs(a - b):.3f} > 2 x std "
                            f"{max(sa, sb):.3f})"
                        )
    return lines


def summarise(runs: list[dict], methods: list[str], start: dict | None = None) -> str:
    """The markdown tables: accuracy over the budget, retention (and drop), expert NLL, wall time; the meta
    steps of AMFT runs; the pairs of methods separated by more than two seed standard deviations."""
    start = start or {}
    cols = axes(runs, start)
    lines = ["| method | " + " | ".join(cols) + " | wall time (s) |", "|---" * (len(cols) + 2) + "|"]
    if start:
        cells = []
        for name in cols:
            key = "val/accuracy" if name.startswith("val/accuracy") else name
            cells.append(f"{start[key]:.3f}" if key in start and not name.startswith("drop ") else "")
        lines.append("| start checkpoint | " + " | ".join(cells) + " | |")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            lines.append(
                f"| {m} | "
                + " | ".join(_fmt([f(r) for r in rs]) for f in cols.values())
                + f" | {_fmt([r['wall_s'] for r in rs], 0)} |"
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
            lines.append(
                f"| {m} | {_fmt([len(r['meta_grads']) for r in rs], 0)} | {_fmt(means, 5)} | {_fmt(shares, 2)} "
                f"| {_fmt(final_mu, 2) if final_mu else ''} |"
            )
    pairs = separated(runs, methods, start)
    if all(sum(r["method"] == m for r in runs) < 2 for m in methods):
        lines += ["", "One run per method: no seed standard deviation, so no pair of methods is tested for separation."]
    else:
        lines += [
            "",
            "Pairs of methods more than two seed standard deviations apart:"
            if pairs
            else "No pair of methods is more than two seed standard deviations apart on any axis.",
            "",
            *pairs,
        ]
    return "\n".join(lines).rstrip()


def plot(runs: list[dict], methods: list[str], path: Path, start: dict | None = None) -> bool:
    """curves.png: val/accuracy and mean retention against policy updates (seed means), the final
    val/expert_nll_correct per method (seed mean and std), and train/mu."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    start = start or {}
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(12, 8))

    def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
        return [(s + 1, statistics.mean(dict(c)[s] for c in curves)) for s in steps]

    skills = sorted({k for r in runs for k in r.get("retention_curves", {})})
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        kw = {"color": f"C{i}", "label": m}
        acc = mean_curve([r["accuracy_curve"] for r in rs if r["accuracy_curve"]])
        if acc:
            ax1.plot(*zip(*acc), marker="o", ms=3, **kw)
        if skills:
            per_run = [
                [
                    (s, statistics.mean(dict(r["retention_curves"][k])[s] for k in skills))
                    for s, _ in r["retention_curves"][skills[0]]
                ]
                for r in rs
                if r.get("retention_curves")
            ]
            ret = mean_curve(per_run)
            if ret:
                ax2.plot(*zip(*ret), marker="o", ms=3, **kw)
        nll = [r["final_expert_nll_correct"] for r in rs]
        ax3.bar(i, statistics.mean(nll), yerr=statistics.stdev(nll) if len(nll) > 1 else 0, color=f"C{i}")
        for j, r in enumerate(rs):
            if r["mu_curve"]:
                ax4.plot(*zip(*r["mu_curve"]), color=f"C{i}", alpha=0.8, label=m if j == 0 else None)
    if "val/accuracy" in start:
        ax1.axhline(start["val/accuracy"], color="k", ls="--", lw=1, label="start checkpoint")
    base_ret = [start[f"val/retention/{k}"] for k in skills if f"val/retention/{k}" in start]
    if base_ret:
        ax2.axhline(statistics.mean(base_ret), color="k", ls="--", lw=1, label="start checkpoint")
    budget = max((r["steps"] for r in runs), default=0)
    for q in BUDGET_POINTS:  # where the table reads the accuracy
        ax1.axvline(budget * q / 100, color="grey", lw=0.5, alpha=0.5)
    ax1.set(xlabel="policy updates", ylabel="val/accuracy", title="in domain (sample efficiency)")
    ax2.set(
        xlabel="policy updates",
        ylabel="mean val/retention/<skill>",
        title="retention: " + ", ".join(skills) if skills else "retention",
    )
    ax3.set(
        xticks=range(len(methods)),
        ylabel="final val/expert_nll_correct (nats/token)",
        title="imitation where the expert is right",
    )
    ax3.set_xticklabels(methods, rotation=30, fontsize=8)
    ax4.set(xlabel="policy updates", ylabel="train/mu (SFT weight)", title="mu")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="policy updates per run (a multiple of 4)")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="policy updates between validations; must divide --steps / 4 (default: its largest "
        "divisor that gives at least 8 validations)",
    )
    p.add_argument(
        "--start",
        choices=["base", "scratch"],
        default="base",
        help="the checkpoint every run starts from: the multi-skill base checkpoint (embedded-base) "
        "or the freshly initialised model (embedded)",
    )
    p.add_argument(
        "--expert-error-rate",
        type=float,
        default=DEFAULT_ERROR_RATE,
        help="share of addition problems the expert systematically gets wrong (data.expert_error_rate)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 2 methods, 1 seed, 8 steps (and, unless {embedded.BASE_STEPS_ENV} is set, a "
        f"base checkpoint pre-trained for 20 updates)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with --threads torch threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--from-runs", action="store_true", help="train nothing: summarise the finished runs already under --out"
    )
    a, extra = p.parse_known_args()  # anything else is passed to every train.py run
    if a.quick:
        a.methods, a.seeds, a.steps, a.val_every = ["sft", "chord_phi"], [0], 8, 2
        extra += [
            "--trainer.limit_val_batches=1",
            "--data.init_args.expert_batch_size=8",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.val_batch_size=20",
        ]
        os.environ.setdefault(embedded.BASE_STEPS_ENV, "20")
    if a.steps < 4 or a.steps % 4:
        p.error(f"--steps={a.steps} must be a positive multiple of 4 (accuracy is reported at 25%, 50% and 100%)")
    # default: the largest divisor of steps / 4 that gives at least 8 validations
    a.val_every = a.val_every or max(d for d in range(1, a.steps // 8 + 1) if (a.steps // 4) % d == 0)
    if a.val_every < 1 or (a.steps // 4) % a.val_every:
        p.error(f"--val-every={a.val_every} must divide --steps / 4 = {a.steps // 4}")
    if not 0.0 <= a.expert_error_rate <= 0.45:
        p.error(f"--expert-error-rate={a.expert_error_rate} must lie in [0, 0.45]")
    a.out.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[int, str]) -> dict:
        seed, m = job
        r = run_one(m, seed, a.steps, a.val_every, a.out, extra, a.threads, a.start, a.expert_error_rate)
        ret = " ".join(f"{k} {v:.3f}" for k, v in r["final_retention"].items())
        print(
            f"{m} seed {seed}: final acc {r['final_accuracy']:.3f} retention {ret} "
            f"expert_nll_correct {r['final_expert_nll_correct']:.3f} ({r['wall_s']:.0f} s)",
            flush=True,
        )
        return r

    start_time = time.perf_counter()
    start_file = a.out / "start.json"
    if a.from_runs:
        runs = finished_runs(a.out, a.methods, a.seeds, a.steps)
        a.seeds = sorted({r["seed"] for r in runs})
        start = json.loads(start_file.read_text()) if start_file.exists() else {}
    else:
        start = evaluate_start(a.start, a.expert_error_rate, a.out, extra, a.threads)  # builds the base first
        start_file.write_text(json.dumps(start, indent=1))
        with ThreadPoolExecutor(a.jobs) as pool:
            runs = list(pool.map(one, [(seed, m) for seed in a.seeds for m in a.methods]))
    total = time.perf_counter() - start_time
    table = summarise(runs, a.methods, start)
    earlier = a.out / "methods.md"
    first = earlier.read_text().split("\n", 1)[0] if a.from_runs and earlier.exists() else ""
    if "whole benchmark" in first:  # re-summarising a complete run: keep how it was measured
        header = f"{first} Summarised again on {date.today()} with `python benchmarks/methods.py --from-runs`.\n\n"
    else:
        if a.from_runs:
            how = (
                f"`python benchmarks/methods.py --from-runs --out {a.out}`, summarising the runs that had "
                f"finished (wall time: span of each run's event file, training and validation only)"
            )
        else:
            how = (
                f"`{' '.join(['python benchmarks/methods.py', *sys.argv[1:]])}` "
                f"({a.jobs} runs at once, {a.threads} torch thread each; whole benchmark {total / 60:.1f} min)"
            )
        begin = (
            "the multi-skill base checkpoint (embedded-base)"
            if a.start == "base"
            else "the freshly initialised model (embedded)"
        )
        header = (
            f"Embedded addition task, noisy expert ({a.expert_error_rate:.0%} systematic carry errors); every run "
            f"starts from {begin}; {a.steps} policy updates per run; seeds {a.seeds}; {date.today()}; {how}.\n\n"
        )
    (a.out / "methods.md").write_text(header + table + "\n")
    (a.out / "methods.json").write_text(json.dumps(runs, indent=1))
    plotted = plot(runs, a.methods, a.out / "curves.png", start)
    print(table)
    print(f"wrote {a.out / 'methods.md'}" + (f" and {a.out / 'curves.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
