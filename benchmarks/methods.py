"""Method comparison on the embedded task: same policy-update budget, same seeds, the same axes for every method.

    python benchmarks/methods.py --seeds 0 1 2 --steps 400 --jobs 2 --out benchmarks/results/methods
    python benchmarks/methods.py --quick          # smoke test: every method, a few steps

Ten methods (``--methods``): SFT, GRPO, SFT-then-GRPO, CHORD-mu, CHORD-phi, AMFT, LUFFY, SRFT, HPT and
Prefix-RFT (``amft_reward``, AMFT with the paper's meta-objective, on request). Every run of seed s starts from
``embedded-instruct-<s>`` (``--start instruct``, the default: the multi-skill base pre-trained to sample like an
instruct model, one per seed, built and cached on first use), from the over-confident ``embedded-base``
(``--start base``) or from the freshly initialised model (``--start scratch``). Each run is
``train.py fit --config configs/<method>.yaml`` in its own process with the same peak lr; the numbers are read
back from its TensorBoard event file, and each starting checkpoint is measured once with ``train.py validate``.
SFT-then-GRPO runs each ``--switch-points`` share of the budget as its SFT stage on the first seed; the best
final val/accuracy is the switch point of the other seeds (the sequential baseline, tuned).
Axes, per method (mean +- std over seeds): in-domain accuracy (val/accuracy) after 25%, 50% and 100% of the
update budget; retention (val/retention/<skill>, greedy accuracy on held-out problems of the skills the
post-training data never shows) and its drop from the run's starting checkpoint; the held-out expert NLL on the
demonstrations the reward accepts (val/expert_nll_correct); val/pass@1 and val/pass@16 (``--pass-at-k``: the
unbiased estimator from 16 samples per held-out problem at temperature 1).
Writes ``<out>/methods.md`` (the tables, the switch points tried, and the pairs of methods that differ by more
than two seed standard deviations on an axis), ``<out>/methods.json`` (every run in the table),
``<out>/switch.json`` (SFT-then-GRPO's candidates), ``<out>/start.json`` (each seed's starting checkpoint) and,
when matplotlib is present, ``<out>/curves.png`` (every method on every axis, and train/mu).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_align.data import embedded  # noqa: E402
from lit_align.events import read_scalars  # noqa: E402

BUDGET_POINTS = (25, 50, 100)  # per cent of the update budget at which val/accuracy is reported
PASS_AT_K = (1, 16)  # val/pass@k reported per method (model.pass_at_k; n = 16 samples per held-out problem)
BASE_LR = 3e-4  # from a base checkpoint (instruct or base), every method's peak lr (docs/results/methods.md)
# ... and every method's lr schedule: GRPO's config holds its lr constant and Prefix-RFT's warms up for 20
# updates; with one schedule for all, GRPO from embedded-instruct ended at 0.984 / 0.984 on seeds 0 / 1
# instead of 0.966 / 0.900 and forgot less (docs/results/methods.md, the control)
BASE_SCHEDULE = ["--model.init_args.warmup_steps=50", "--model.init_args.lr_decay=cosine"]
DEFAULT_ERROR_RATE = 0.40  # the expert's systematic-error class (data.expert_error_rate; README, Results)
METHODS = [
    "sft",
    "grpo",
    "sft_then_grpo",
    "chord_mu",
    "chord_phi",
    "amft",
    "luffy",
    "srft",
    "hpt",
    "prefix_rft",
    "amft_reward",
]
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
# SFT-then-GRPO's SFT stage as a share of the budget (model.sft_steps = share x --steps): from a base checkpoint
# the candidates tried on the first seed, the best final val/accuracy kept for every seed (--switch-points);
# from scratch the configs' 1000 of 1500
SWITCH_POINTS = (0.125, 0.25, 0.5)
SWITCH_POINTS_SCRATCH = (1000 / 1500,)
# the other schedules that count updates, as a share of the run so that --steps scales them. From scratch
# (configs: 1500 updates) the mixed recipes' SFT warm-up is 1000 of 1500
SHARES_SCRATCH = {
    "chord_mu": {"sft_warmup_steps": 1000 / 1500},
    "chord_phi": {"sft_warmup_steps": 1000 / 1500},
    "amft": {"warmup_sft_steps": 1000 / 1500},
    "amft_reward": {"warmup_sft_steps": 1000 / 1500},
    "prefix_rft": {"prefix_steps": 300 / 400},
}
# from a base checkpoint, each recipe as its paper runs it from an instruct model: CHORD-mu and CHORD-phi with no
# SFT warm-up (mu's schedule from update 0); AMFT with its paper's 50-update warm-up (per 1500 updates);
# Prefix-RFT's prefix length decaying over the first three quarters of the run (configs/prefix_rft.yaml)
SHARES_BASE = {
    "chord_mu": {"sft_warmup_steps": 0.0},
    "chord_phi": {"sft_warmup_steps": 0.0},
    "amft": {"warmup_sft_steps": 50 / 1500},
    "amft_reward": {"warmup_sft_steps": 50 / 1500},
    "prefix_rft": {"prefix_steps": 300 / 400},
}
STARTS = {
    "instruct": "the instruct-like base checkpoint of each seed (embedded-instruct-<seed>)",
    "base": "the multi-skill base checkpoint (embedded-base)",
    "scratch": "the freshly initialised model (embedded)",
}


class Children:
    """The ``train.py`` processes the benchmark has running, so that a failed run or a stop (SIGTERM, Ctrl-C)
    ends the others at once instead of after every queued run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, args: list[str], env: dict) -> tuple[int, str]:
        """Run ``args`` in the repository root; (return code, stderr). Raises RuntimeError once stopped."""
        with self.lock:
            if self.stopped:
                raise RuntimeError("the benchmark is stopping: run not started")
            proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            self.running.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with self.lock:
                self.running.discard(proc)
        return proc.returncode, stderr

    def stop(self) -> None:
        """Start no more runs and end the running ones (SIGTERM, then SIGKILL after 10 s)."""
        with self.lock:
            self.stopped = True
            procs = list(self.running)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


CHILDREN = Children()


def model_name(start: str, seed: int) -> str:
    """The checkpoint a run of ``seed`` starts from: ``embedded-instruct-<seed>`` (one per seed),
    ``embedded-base`` or ``embedded`` (one for every seed)."""
    if start == "instruct":
        return f"{embedded.INSTRUCT_NAME}-{seed}"
    return embedded.BASE_NAME if start == "base" else embedded.EMBEDDED_NAME


def start_args(start: str, error_rate: float, seed: int = 0, pass_at_k: tuple[int, ...] = PASS_AT_K) -> list[str]:
    """train.py arguments every run of ``seed`` (and its starting checkpoint's evaluation) gets; from a base
    checkpoint every method has the same peak learning rate (BASE_LR) and schedule (BASE_SCHEDULE: 50 warm-up
    updates, cosine decay to 0.1 x lr)."""
    args = [
        f"--model.init_args.model_name_or_path={model_name(start, seed)}",
        f"--data.init_args.expert_error_rate={error_rate}",
        "--data.init_args.retention_data=embedded",
    ]
    if pass_at_k:
        args.append(f"--model.init_args.pass_at_k=[{','.join(str(k) for k in pass_at_k)}]")
    if start != "scratch":
        args += [f"--model.init_args.optimizer.init_args.lr={BASE_LR}", *BASE_SCHEDULE]
    return args


def evaluate_start(
    start: str,
    error_rate: float,
    out: Path,
    extra: list[str],
    threads: int = 1,
    seed: int = 0,
    pass_at_k: tuple[int, ...] = PASS_AT_K,
) -> dict:
    """The starting checkpoint's held-out numbers (val/accuracy, val/retention/<skill>, val/pass@k, ...) for
    ``seed``, from ``train.py validate`` (which also builds a base checkpoint on first use)."""
    save_dir = start_dir(out, start, seed)
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "validate",
        "--config",
        str(ROOT / "configs" / "sft.yaml"),
        *start_args(start, error_rate, seed, pass_at_k),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code, stderr = CHILDREN.run(args, env)
    if code != 0:
        raise RuntimeError(f"validating {model_name(start, seed)} failed:\n{stderr[-3000:]}")
    return {k: v[-1][1] for k, v in read_scalars(save_dir).items() if k.startswith("val/")}


def start_dir(out: Path, start: str, seed: int) -> Path:
    """Where a starting checkpoint's validation goes: one per seed for ``instruct``, one for every seed else."""
    return out / "runs" / (f"start-{start}-seed{seed}" if start == "instruct" else f"start-{start}")


def switch_dirs(out: Path, seed: int) -> list[Path]:
    """SFT-then-GRPO's run directories of ``seed`` already under ``out``, one per switch point run."""
    return sorted((out / "runs").glob(f"sft_then_grpo-switch*-seed{seed}"))


def run_dir(out: Path, method: str, seed: int, switch: float | None = None) -> Path:
    """Where a run's TensorBoard files go: ``<out>/runs/<method>-seed<seed>``; SFT-then-GRPO's name carries
    its switch point (``sft_then_grpo-switch0.25-seed0``)."""
    return out / "runs" / (f"{method}-switch{switch:g}-seed{seed}" if switch is not None else f"{method}-seed{seed}")


def run_one(
    method: str,
    seed: int,
    steps: int,
    val_every: int,
    out: Path,
    extra: list[str],
    threads: int = 1,
    start: str = "instruct",
    error_rate: float = 0.25,
    switch: float | None = None,
    pass_at_k: tuple[int, ...] = PASS_AT_K,
) -> dict:
    """One ``train.py fit`` of ``configs/<method>.yaml`` (a VARIANTS row: its config and overrides) with
    ``steps`` updates; ``switch``: SFT-then-GRPO's SFT stage as a share of ``steps``. Raises RuntimeError
    with the run's stderr when it fails."""
    if method == "sft_then_grpo" and switch is None:
        raise ValueError("sft_then_grpo needs its switch point (the SFT stage's share of the budget)")
    save_dir = run_dir(out, method, seed, switch if method == "sft_then_grpo" else None)
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
        *start_args(start, error_rate, seed, pass_at_k),
        *extra,
    ]
    if method == "sft_then_grpo":
        args.append(f"--model.init_args.sft_steps={int(steps * switch)}")
    for name, share in (SHARES_SCRATCH if start == "scratch" else SHARES_BASE).get(method, {}).items():
        args.append(f"--model.init_args.{name}={max(int(steps * share), 1 if name == 'prefix_steps' else 0)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    began = time.perf_counter()
    code, stderr = CHILDREN.run(args, env)
    wall = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"{save_dir.name} failed:\n{stderr[-3000:]}")
    return collect(method, seed, save_dir, wall, steps, switch)


def at_budget(curve: list[tuple[int, float]], step: int) -> float:
    """The value logged after ``step`` policy updates (Lightning logs validation after update k at step
    k - 1); NaN when the curve has no such point."""
    return next((v for s, v in curve if s == step - 1), float("nan"))


def collect(method: str, seed: int, save_dir: Path, wall: float, budget: int, switch: float | None = None) -> dict:
    """One run's numbers, read back from its TensorBoard event file; ``budget`` is its update budget,
    ``switch`` SFT-then-GRPO's SFT share of it."""
    s = read_scalars(save_dir)
    acc = s.get("val/accuracy", [])
    retention = {k.removeprefix("val/retention/"): v for k, v in s.items() if k.startswith("val/retention/")}
    pass_curves = {k.removeprefix("val/pass@"): v for k, v in s.items() if k.startswith("val/pass@")}
    return {
        "method": method,
        "seed": seed,
        "switch": switch,
        "final_accuracy": acc[-1][1] if acc else float("nan"),
        # sample efficiency: val/accuracy after a quarter, half and all of the update budget
        "accuracy_at": {f"{q}%": at_budget(acc, budget * q // 100) for q in BUDGET_POINTS},
        "final_retention": {k: v[-1][1] for k, v in retention.items()},
        "retention_curves": retention,
        # pass@k at the sampling temperature on the held-out task (keys: k as a string)
        "final_pass": {k: v[-1][1] for k, v in pass_curves.items()},
        "pass_curves": pass_curves,
        "best_accuracy": max(v for _, v in acc) if acc else float("nan"),
        "final_expert_nll": s["val/expert_nll"][-1][1] if "val/expert_nll" in s else float("nan"),
        # the same over the held-out demonstrations the reward accepts (where the expert is right)
        "final_expert_nll_correct": s["val/expert_nll_correct"][-1][1]
        if "val/expert_nll_correct" in s
        else float("nan"),
        "wall_s": wall,
        "accuracy_curve": acc,
        "mu_curve": s.get("train/mu", []),
        # updates done: the last step anything was logged at (train/* every log_every_n_steps updates, val/*
        # after update k at step k - 1)
        "steps": max((v[-1][0] + 1 for k, v in s.items() if v and k.startswith(("train/", "val/"))), default=0),
        # AMFT: dV/dmu of each meta step that fell on a logging step (log_every_n_steps; Lightning
        # repeats the latest value until the next meta step: deduplicated)
        "meta_grads": [
            v for i, (_, v) in enumerate(s.get("train/meta_grad", [])) if i == 0 or v != s["train/meta_grad"][i - 1][1]
        ],
    }


def mean_retention(r: dict) -> float:
    """A run's final retention averaged over the skills (NaN without any)."""
    values = list(r.get("final_retention", {}).values())
    return statistics.mean(values) if values else float("nan")


def choose_switch(candidates: list[dict]) -> dict:
    """SFT-then-GRPO's run with the best switch point among ``candidates`` (runs of one seed): the highest
    final val/accuracy, ties broken by the higher mean retention, then the earlier switch. Raises
    ValueError when there is none."""
    if not candidates:
        raise ValueError("no SFT-then-GRPO run to choose a switch point from")

    def score(r: dict) -> tuple:
        acc, ret = r["final_accuracy"], mean_retention(r)
        return (acc if acc == acc else -1.0, ret if ret == ret else -1.0, -(r["switch"] or 0.0))

    return max(candidates, key=score)


def split_switch(runs: list[dict], tuning_seed: int) -> tuple[list[dict], list[dict]]:
    """(the runs of the table, SFT-then-GRPO's runs on ``tuning_seed``, one per switch point tried): of those
    candidates only the chosen one (:func:`choose_switch`) is in the table, and of the other seeds'
    SFT-then-GRPO runs those at its switch point."""
    candidates = [r for r in runs if r["method"] == "sft_then_grpo" and r["seed"] == tuning_seed]
    if not candidates:
        return runs, []
    chosen = choose_switch(candidates)
    table = [
        r
        for r in runs
        if r["method"] != "sft_then_grpo"
        or r is chosen
        or (r["seed"] != tuning_seed and r["switch"] == chosen["switch"])
    ]
    return table, candidates


def finished_runs(out: Path, methods: list[str], seeds: list[int], steps: int) -> list[dict]:
    """Runs of an earlier (possibly interrupted) invocation that reached ``steps`` updates, SFT-then-GRPO's at
    every switch point found; wall time is the one that invocation recorded (methods.json, switch.json),
    else the span of the run's event-file timestamps (training and validation, not start-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    measured = {}  # the process wall times an earlier full invocation recorded, where there are any
    for name in ("methods.json", "switch.json"):
        if (out / name).exists():
            for r in json.loads((out / name).read_text()):
                measured[(r["method"], r["seed"], r.get("switch"))] = r["wall_s"]
    runs = []
    for seed in seeds:
        for m in methods:
            found = [(run_dir(out, m, seed), None)]
            if m == "sft_then_grpo":  # one directory per switch point: sft_then_grpo-switch<share>-seed<seed>
                found = [
                    (d, float(d.name.removeprefix(f"{m}-switch").removesuffix(f"-seed{seed}")))
                    for d in switch_dirs(out, seed)
                ]
            for save_dir, switch in found:
                if not save_dir.exists():
                    continue
                times = []
                for f in save_dir.rglob("events.out.tfevents.*"):
                    acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
                    acc.Reload()
                    times += [e.wall_time for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
                span = max(times) - min(times) if times else float("nan")
                r = collect(m, seed, save_dir, measured.get((m, seed, switch), span), steps, switch)
                if r["steps"] >= steps:
                    runs.append(r)
    return runs


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_seed(start: dict) -> dict:
    """The starting checkpoints' numbers as ``{seed: {metric: value}}``: a dict keyed by seeds (ints, or their
    strings as JSON writes them) is one checkpoint per seed; a flat ``{metric: value}`` (one checkpoint for every
    seed) is returned under the key None."""
    if start and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in start):
        return {int(k): v for k, v in start.items()}
    return {None: start or {}}


def start_of(starts: dict, seed: int | None) -> dict:
    """The starting checkpoint's numbers for a run of ``seed`` (:func:`per_seed`'s form)."""
    return starts.get(seed, starts.get(None, {}))


def axes(runs: list[dict], start: dict) -> dict[str, callable]:
    """Axis name -> a function of one run giving its value: the accuracy points, retention per skill and
    its drop from the run's starting checkpoint (start - final: positive is forgetting), the expert NLL,
    pass@k. ``start``: one checkpoint's numbers, or one per seed (:func:`per_seed`)."""
    starts = per_seed(start)
    skills = sorted({k for r in runs for k in r.get("final_retention", {})})
    ks = sorted({int(k) for r in runs for k in r.get("final_pass", {})})
    out = {f"val/accuracy @{q}%": (lambda r, q=q: r["accuracy_at"][f"{q}%"]) for q in BUDGET_POINTS}
    for k in skills:
        out[f"val/retention/{k}"] = lambda r, k=k: r["final_retention"].get(k, float("nan"))
        out[f"drop {k}"] = lambda r, k=k: (
            start_of(starts, r.get("seed")).get(f"val/retention/{k}", float("nan"))
            - r["final_retention"].get(k, float("nan"))
        )
    out["val/expert_nll_correct"] = lambda r: r["final_expert_nll_correct"]
    for k in ks:
        out[f"val/pass@{k}"] = lambda r, k=k: r.get("final_pass", {}).get(str(k), float("nan"))
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


def switch_table(candidates: list[dict], budget: int) -> str:
    """SFT-then-GRPO's switch points tried on one seed, and the one chosen (:func:`choose_switch`)."""
    chosen = choose_switch(candidates)
    lines = [
        f"SFT-then-GRPO's switch point, tried on seed {chosen['seed']} and chosen by final val/accuracy (ties: mean "
        "retention); the other seeds run the chosen one:",
        "",
        "| SFT updates (share of the budget) | "
        + " | ".join(f"val/accuracy @{q}%" for q in BUDGET_POINTS)
        + " | mean retention | "
        + "".join(f"val/pass@{k} | " for k in sorted(int(k) for k in chosen.get("final_pass", {})))
        + "chosen |",
    ]
    lines.append("|---" * (len(BUDGET_POINTS) + len(chosen.get("final_pass", {})) + 3) + "|")
    for r in sorted(candidates, key=lambda r: r["switch"]):
        passes = [r["final_pass"].get(k, float("nan")) for k in sorted(chosen.get("final_pass", {}), key=int)]
        lines.append(
            f"| {int(budget * r['switch'])} ({r['switch']:g}) | "
            + " | ".join(f"{r['accuracy_at'][f'{q}%']:.3f}" for q in BUDGET_POINTS)
            + f" | {mean_retention(r):.3f} | "
            + "".join(f"{v:.3f} | " for v in passes)
            + ("yes |" if r is chosen else " |")
        )
    return "\n".join(lines)


def summarise(runs: list[dict], methods: list[str], start: dict | None = None) -> str:
    """The markdown tables: accuracy over the budget, retention (and drop), expert NLL, pass@k, wall time; the
    meta steps of AMFT runs; the pairs of methods separated by more than two seed standard deviations.
    ``start``: the starting checkpoint's numbers, one dict or one per seed (:func:`per_seed`; its row is the
    mean and std over the seeds)."""
    starts = {s: v for s, v in per_seed(start or {}).items() if v}
    cols = axes(runs, start or {})
    lines = ["| method | " + " | ".join(cols) + " | wall time (s) |", "|---" * (len(cols) + 2) + "|"]
    if starts:
        cells = []
        for name in cols:
            key = "val/accuracy" if name.startswith("val/accuracy") else name
            values = [v[key] for v in starts.values() if key in v]
            cells.append(_fmt(values) if values and not name.startswith("drop ") else "")
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
    pairs = separated(runs, methods, start or {})
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
    """curves.png: val/accuracy and mean retention against policy updates (seed means, every method), the final
    val/expert_nll_correct, pass@k and retention drop per method (seed mean and std), and train/mu."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    starts = [v for v in per_seed(start or {}).values() if v]
    fig, ((ax1, ax2, ax5), (ax3, ax4, ax6)) = plt.subplots(2, 3, figsize=(18, 9))
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors

    def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
        return [(s + 1, statistics.mean(dict(c)[s] for c in curves)) for s in steps]

    def bar(ax, x, values, **kw):
        values = [v for v in values if v == v]
        if values:
            ax.bar(x, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0, **kw)

    skills = sorted({k for r in runs for k in r.get("retention_curves", {})})
    cols = axes(runs, start or {})
    ks = sorted({int(k) for r in runs for k in r.get("final_pass", {})})
    width = 0.8 / max(len(ks), 1)
    shown = [m for m in methods if any(r["method"] == m for r in runs)]
    for i, m in enumerate(shown):
        rs = [r for r in runs if r["method"] == m]
        colour = colours[i % len(colours)]
        kw = {"color": colour, "label": m}
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
            # the table's drop columns (each run against its own seed's start), averaged over the skills
            drops = [statistics.mean(cols[f"drop {k}"](r) for k in skills) for r in rs]
            bar(ax6, i, drops, color=colour)
        bar(ax3, i, [r["final_expert_nll_correct"] for r in rs], color=colour)
        for j, k in enumerate(ks):
            bar(
                ax5,
                i + (j - (len(ks) - 1) / 2) * width,
                [r.get("final_pass", {}).get(str(k), float("nan")) for r in rs],
                width=width,
                color=colour,
                alpha=1.0 - 0.5 * j / max(len(ks) - 1, 1),
                edgecolor="k",
                linewidth=0.3,
            )
        for j, r in enumerate(rs):
            if r["mu_curve"]:
                ax4.plot(*zip(*r["mu_curve"]), color=colour, alpha=0.8, label=m if j == 0 else None)
    if starts and all("val/accuracy" in s for s in starts):
        ax1.axhline(statistics.mean(s["val/accuracy"] for s in starts), color="k", ls="--", lw=1, label="start")
    base_ret = [s[f"val/retention/{k}"] for s in starts for k in skills if f"val/retention/{k}" in s]
    if base_ret:
        ax2.axhline(statistics.mean(base_ret), color="k", ls="--", lw=1, label="start")
    for j, k in enumerate(ks):
        values = [s[f"val/pass@{k}"] for s in starts if f"val/pass@{k}" in s]
        if values:
            ax5.axhline(statistics.mean(values), color="k", ls="--" if j else ":", lw=1, label=f"start pass@{k}")
    budget = max((r["steps"] for r in runs), default=0)
    for q in BUDGET_POINTS:  # where the table reads the accuracy
        ax1.axvline(budget * q / 100, color="grey", lw=0.5, alpha=0.5)
    ax1.set(xlabel="policy updates", ylabel="val/accuracy", title="in domain (sample efficiency)")
    ax2.set(
        xlabel="policy updates",
        ylabel="mean val/retention/<skill>",
        title="retention: " + ", ".join(skills) if skills else "retention",
    )
    for ax, ylabel, title in (
        (ax3, "final val/expert_nll_correct (nats/token)", "imitation where the expert is right"),
        (ax5, "final val/pass@k (" + ", ".join(f"k={k}" for k in ks) + ", left to right)", "pass@k at T = 1"),
        (ax6, "retention drop from the start (mean over skills)", "forgetting"),
    ):
        ax.set(xticks=range(len(shown)), ylabel=ylabel, title=title)
        ax.set_xticklabels(shown, rotation=30, fontsize=8)
    ax4.set(xlabel="policy updates", ylabel="train/mu (SFT weight)", title="mu")
    for ax in (ax1, ax2, ax5):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def results(required: list[Future], submitted: list[Future]) -> list:
    """The results of ``required`` once they are done; raises the first exception of any ``submitted``
    future as soon as it is known (a failed run stops the benchmark without waiting for the queue)."""
    while True:
        for f in submitted:
            if f.done() and f.exception() is not None:
                raise f.exception()
        pending = [f for f in required if not f.done()]
        if not pending:
            return [f.result() for f in required]
        wait(pending + [f for f in submitted if not f.done()], timeout=5, return_when=FIRST_COMPLETED)


def planned_dirs(out: Path, a: argparse.Namespace) -> list[Path]:
    """The run directories an invocation will write (SFT-then-GRPO's other seeds: any switch point)."""
    seeds = a.seeds if a.start == "instruct" else a.seeds[:1]
    dirs = [start_dir(out, a.start, s) for s in seeds]
    for seed in a.seeds:
        for m in a.methods:
            if m != "sft_then_grpo":
                dirs.append(run_dir(out, m, seed))
            elif seed == a.seeds[0]:
                dirs += [run_dir(out, m, seed, share) for share in a.switch_points]
            else:
                dirs += switch_dirs(out, seed) or [run_dir(out, m, seed, 0.5)]
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument(
        "--steps", type=int, default=None, help="policy updates per run, a multiple of 4 (default 400; --quick: 8)"
    )
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="policy updates between validations; must divide --steps / 4 (default: its largest "
        "divisor that gives at least 8 validations)",
    )
    p.add_argument(
        "--start",
        choices=list(STARTS),
        default="instruct",
        help="the checkpoint every run starts from: the instruct-like base of its seed (embedded-instruct-<seed>), "
        "the multi-skill base checkpoint (embedded-base) or the freshly initialised model (embedded)",
    )
    p.add_argument(
        "--switch-points",
        nargs="+",
        type=float,
        default=None,
        help="SFT-then-GRPO's SFT stage as shares of --steps (each a distinct number of SFT updates, at least one), "
        "each tried on the first seed; the one with the best "
        f"final val/accuracy runs on the other seeds (default: {' '.join(f'{s:g}' for s in SWITCH_POINTS)}; "
        f"--start scratch: {SWITCH_POINTS_SCRATCH[0]:.3g})",
    )
    p.add_argument(
        "--pass-at-k",
        nargs="*",
        type=int,
        default=list(PASS_AT_K),
        help="the k of val/pass@k (n = the largest k samples per held-out problem, at the sampling temperature); "
        "none: no pass@k",
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
        help=f"smoke test: every default method (and three switch points), 1 seed, 8 steps, small batches (and, "
        f"unless {embedded.BASE_STEPS_ENV} is set, a base checkpoint pre-trained for 20 updates)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with --threads torch threads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--from-runs", action="store_true", help="train nothing: summarise the finished runs already under --out"
    )
    a, extra = p.parse_known_args()  # anything else is passed to every train.py run
    if a.quick:  # what --seeds, --steps and --val-every do not say
        a.seeds = a.seeds or [0]
        a.val_every = a.val_every or (2 if a.steps is None else None)
        a.steps = a.steps or 8
        extra += [
            "--trainer.limit_val_batches=1",
            "--data.init_args.expert_batch_size=8",
            "--data.init_args.prompt_batch_size=2",
            "--data.init_args.val_batch_size=20",
            "--data.init_args.meta_batch_size=8",  # AMFT's held-out batch (the other modules ignore it)
        ]
        os.environ.setdefault(embedded.BASE_STEPS_ENV, "20")
    a.seeds = a.seeds if a.seeds is not None else [0, 1, 2]
    a.steps = a.steps if a.steps is not None else 400
    if a.steps < 4 or a.steps % 4:
        p.error(f"--steps={a.steps} must be a positive multiple of 4 (accuracy is reported at 25%, 50% and 100%)")
    # default: the largest divisor of steps / 4 that gives at least 8 validations
    a.val_every = a.val_every or max(d for d in range(1, a.steps // 8 + 1) if (a.steps // 4) % d == 0)
    if a.val_every < 1 or (a.steps // 4) % a.val_every:
        p.error(f"--val-every={a.val_every} must divide --steps / 4 = {a.steps // 4}")
    if not 0.0 <= a.expert_error_rate <= 0.45:
        p.error(f"--expert-error-rate={a.expert_error_rate} must lie in [0, 0.45]")
    if a.switch_points is None:
        a.switch_points = list(SWITCH_POINTS_SCRATCH if a.start == "scratch" else SWITCH_POINTS)
    if any(not 0.0 < s < 1.0 for s in a.switch_points):
        p.error(f"--switch-points={a.switch_points}: each must lie in (0, 1), a share of --steps")
    sft_updates = [int(a.steps * s) for s in a.switch_points]
    if (
        "sft_then_grpo" in a.methods
        and not a.from_runs
        and (min(sft_updates) < 1 or len(set(sft_updates)) < len(sft_updates))
    ):
        # each point is a run of its own directory: a repeat would run twice into one (and read back merged),
        # and 0 SFT updates is plain GRPO under SFT-then-GRPO's name
        p.error(
            f"--switch-points={a.switch_points} give {sft_updates} SFT updates of --steps {a.steps}: each must give "
            "at least one, and no two the same"
        )
    if any(k < 1 for k in a.pass_at_k):
        p.error(f"--pass-at-k={a.pass_at_k}: each k must be an integer >= 1")
    pass_at_k = tuple(sorted(set(a.pass_at_k)))
    if not a.from_runs:
        # a run directory that exists would get a second version, read back merged with the first
        taken = [d for d in planned_dirs(a.out, a) if d.exists()]
        if taken:
            p.error(
                f"--out {a.out} already holds {len(taken)} of this invocation's run directories ({taken[0]}, ...): "
                "give another --out, remove them, or summarise them with --from-runs"
            )
    a.out.mkdir(parents=True, exist_ok=True)

    def one(seed: int, m: str, switch: float | None = None) -> dict:
        r = run_one(
            m, seed, a.steps, a.val_every, a.out, extra, a.threads, a.start, a.expert_error_rate, switch, pass_at_k
        )
        ret = " ".join(f"{k} {v:.3f}" for k, v in r["final_retention"].items())
        passes = " ".join(f"pass@{k} {v:.3f}" for k, v in r["final_pass"].items())
        print(
            f"{m}{f' (switch {switch:g})' if switch is not None else ''} seed {seed}: final acc "
            f"{r['final_accuracy']:.3f} retention {ret} {passes} expert_nll_correct "
            f"{r['final_expert_nll_correct']:.3f} ({r['wall_s']:.0f} s)",
            flush=True,
        )
        return r

    start_time = time.perf_counter()
    start_file = a.out / "start.json"
    if a.from_runs:
        runs = finished_runs(a.out, a.methods, a.seeds, a.steps)
        if not runs:
            p.error(f"--from-runs: no run under {a.out / 'runs'} reached --steps {a.steps} (give the --steps it ran)")
        a.seeds = sorted({r["seed"] for r in runs})
        start = json.loads(start_file.read_text()) if start_file.exists() else {}
    else:

        def stop_on_signal(signum, frame):  # SIGTERM: end the running train.py processes too
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop_on_signal)
        pool = ThreadPoolExecutor(a.jobs)
        submitted: list[Future] = []
        try:
            # the starting checkpoints first (a base checkpoint is built on first use, one per seed for instruct)
            seeds = a.seeds if a.start == "instruct" else a.seeds[:1]
            futures = [
                pool.submit(evaluate_start, a.start, a.expert_error_rate, a.out, extra, a.threads, s, pass_at_k)
                for s in seeds
            ]
            submitted += futures
            values = results(futures, submitted)
            start = dict(zip(seeds, values)) if a.start == "instruct" else values[0]
            start_file.write_text(json.dumps(start, indent=1))
            # SFT-then-GRPO's switch points on the first seed go first, so that its other seeds can follow
            tuning = "sft_then_grpo" in a.methods
            candidates = [pool.submit(one, a.seeds[0], "sft_then_grpo", s) for s in a.switch_points] if tuning else []
            rest = [pool.submit(one, s, m) for s in a.seeds for m in a.methods if m != "sft_then_grpo"]
            submitted += candidates + rest
            if tuning:
                chosen = choose_switch(results(candidates, submitted))["switch"]
                later = [pool.submit(one, s, "sft_then_grpo", chosen) for s in a.seeds[1:]]
                rest += later
                submitted += later
            runs = results(candidates + rest, submitted)
        except BaseException:
            CHILDREN.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            print(
                f"stopped: the runs that finished are under {a.out / 'runs'}; `--from-runs` summarises those that "
                "reached --steps",
                file=sys.stderr,
            )
            raise
        pool.shutdown()
    total = time.perf_counter() - start_time
    runs, candidates = split_switch(runs, a.seeds[0])
    order = {m: i for i, m in enumerate(a.methods)}
    runs.sort(key=lambda r: (r["seed"], order[r["method"]]))
    table = summarise(runs, a.methods, start)
    if candidates:
        table += "\n\n" + switch_table(candidates, a.steps)
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
        header = (
            f"Embedded addition task, noisy expert ({a.expert_error_rate:.0%} systematic carry errors); every run "
            f"starts from {STARTS[a.start]}; {a.steps} policy updates per run; seeds {a.seeds}; {date.today()}; "
            f"{how}.\n\n"
        )
    (a.out / "methods.md").write_text(header + table + "\n")
    (a.out / "methods.json").write_text(json.dumps(runs, indent=1))
    (a.out / "switch.json").write_text(json.dumps(candidates, indent=1))
    plotted = plot(runs, a.methods, a.out / "curves.png", start)
    print(table)
    print(
        f"whole benchmark {total / 60:.1f} min; wrote {a.out / 'methods.md'}"
        + (f" and {a.out / 'curves.png'}" if plotted else "")
    )


if __name__ == "__main__":
    main()
