"""Training-equivalence check: does a code change reproduce the training of the code before it?

Dump a run (``train.py fit`` for 20 policy updates, seed from the config, validation and checkpoints
off, logs in a temporary folder), then compare two dumps: the first policy update's gradients (before
clipping: what ``clip_grad_norm_`` is handed) and loss, and the logged ``train/loss``,
``train/reward_mean`` and ``train/mu`` of every update. Exit status 1 if a relative difference exceeds
``--tol`` (1e-6). The run is driven only through the CLI and observed through a Lightning callback
(benchmarks/_equivalence_callback.py) and the logged metrics, so the script does not depend on how
lit_align/modules is organised.

The reference dumps (code before the lit_align/modules refactor; one torch thread; the embedded
checkpoints in a cache of their own, so that no other run can rebuild or swap them):

    B=/work/equiv_baseline; C="--cache $B/cache"; E=".venv/bin/python benchmarks/equivalence.py"
    $E dump --config configs/chord_phi.yaml --out $B --name chord_phi $C
    $E dump --config configs/chord_phi.yaml --out $B --name chord_phi_mixed $C -- \\
        --model.init_args.sft_warmup_steps 0
    $E dump --config configs/chord_phi.yaml --out $B --name chord_phi_spg $C -- \\
        --model.init_args.sft_warmup_steps 0 --model.init_args.steps_per_generation 2 \\
        --model.init_args.micro_batch_size 8
    $E dump --config configs/amft.yaml --out $B --name amft $C
    $E dump --config configs/amft.yaml --out $B --name amft_meta $C -- \\
        --model.init_args.warmup_sft_steps 0 --model.init_args.meta_interval 5
    $E dump --config configs/grpo.yaml --out $B --name grpo $C
    LIT_ALIGN_BASE_STEPS=300 $E dump --config configs/grpo.yaml --out $B --name grpo_base $C -- \\
        --model.init_args.model_name_or_path embedded-base
    LIT_ALIGN_BASE_STEPS=300 $E dump --config configs/chord_phi.yaml --out $B --name chord_phi_mixed_base $C -- \\
        --model.init_args.sft_warmup_steps 0 --model.init_args.model_name_or_path embedded-base
    LIT_ALIGN_BASE_STEPS=300 $E dump --config configs/amft.yaml --out $B --name amft_meta_base $C -- \\
        --model.init_args.warmup_sft_steps 0 --model.init_args.meta_interval 5 \\
        --model.init_args.model_name_or_path embedded-base

From the freshly initialised model (``embedded``) every group's rewards are equal in the first update,
so its RL gradient is zero there: the ``*_base`` runs (the base checkpoint, 300 pre-training updates)
are the ones whose first update has a non-zero RL gradient (GRPO, CHORD's mixture, AMFT's).

Check a change: the same commands with ``--out /tmp/after`` (same ``--cache``) from the changed tree,
then for each NAME

    $E compare $B/NAME.pt /tmp/after/NAME.pt        # -v: every tensor and every logged metric

Notes. ``--threads`` (default 1) sets OMP_NUM_THREADS / MKL_NUM_THREADS of the run: CPU float reductions
depend on the thread count, so compare dumps made with the same count (compare warns otherwise). Each
dump holds a hash of the policy's weights at the start of training; compare fails when they differ
(another checkpoint, e.g. an embedded-base built with another LIT_ALIGN_BASE_STEPS or thread count).
A run that builds an embedded asset in the cache samples differently from one that finds it (building
the checkpoint reseeds torch's global RNG mid-run), so such a run is repeated once the cache is warm.
Two runs of the same code are bit-identical. The 20-update tolerance is tight: reordering the same sums
(e.g. ``micro_batch_size 8`` instead of one pass) gives first-update differences of ~2e-7 but train/loss
differences of ~1e-6 after one update and ~8e-6 after 20, as Adam amplifies rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECKED_METRICS = ("train/loss", "train/reward_mean", "train/mu")
# shown without -v too, not checked: the update size, AMFT's meta step (dV/dmu, V(theta')), the RL share
SHOWN_METRICS = ("train/grad_norm", "train/meta_grad", "train/val_objective", "train/reward_std")


# ----------------------------------------------------------------------------- dump
def dump(args: argparse.Namespace, extra: list[str]) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.config).stem
    target = (out_dir / f"{name}.pt").resolve()
    config = Path(args.config).resolve() if Path(args.config).exists() else ROOT / args.config  # run from ROOT
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.cache:
        env["LIT_ALIGN_CACHE"] = str(Path(args.cache).resolve())
    with tempfile.TemporaryDirectory(prefix=f"equivalence-{name}-") as logs:
        recorder = {"class_path": "_equivalence_callback.EquivalenceRecorder", "init_args": {"out": str(target)}}
        cmd = [
            args.python,
            "-c",
            "import _equivalence_callback as e; e.launch()",
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            logs,
            "--trainer.logger.init_args.save_dir",
            logs,
            "--trainer.callbacks+=" + json.dumps(recorder),
            *extra,
        ]
        cache = _cache_dir(env)
        for attempt in (1, 2):
            if target.exists():
                target.unlink()
            before = _tree(cache)
            print("+", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            wall = time.perf_counter() - t0
            built = sorted(_tree(cache) - before)
            if rc != 0 or not built:
                break
            # Building an embedded checkpoint reseeds torch's global RNG (build_checkpoint's manual_seed) in
            # the middle of the run, so a run that builds a cached asset samples differently from one that finds it.
            print(f"dump {name}: the run built cached assets in {cache} ({', '.join(built[:3])}...): running again")
    if rc != 0 or not target.exists():
        print(f"dump {name}: train.py exited {rc}" + ("" if target.exists() else f", no {target}"), file=sys.stderr)
        return rc or 1
    import torch

    record = torch.load(target, weights_only=True)
    record["run"] = {
        "config": args.config,
        "extra_args": extra,
        "command": cmd,
        "steps": args.steps,
        "threads": args.threads,
        "env": {k: env[k] for k in ("LIT_ALIGN_BASE_STEPS", "LIT_ALIGN_CACHE") if k in env},
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "torch": str(torch.__version__),
        "wall_seconds": wall,
        "attempts": attempt,
    }
    torch.save(record, target)
    first = record["first_update"] or {}
    rewards = [s["metrics"].get("train/reward_std") for s in record["steps"][:1]]
    print(
        f"dump {name}: {target} | {len(record['steps'])} updates | first loss {first.get('loss')} | "
        f"first reward_std {rewards[0] if rewards else None} | grads: {first.get('grads_source')} | "
        f"wall {wall:.1f} s"
    )
    return 0


def _cache_dir(env: dict) -> Path:
    """The run's LIT_ALIGN_CACHE (lit_align.data.embedded.cache_dir's rule)."""
    return Path(env.get("LIT_ALIGN_CACHE") or Path.home() / ".cache" / "lit_align")


def _tree(root: Path) -> set[str]:
    """Paths under ``root`` (files and folders), relative to it."""
    if not root.exists():
        return set()
    found = set()
    for folder, dirs, files in os.walk(root):
        for entry in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, entry), root))
    return found


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# ----------------------------------------------------------------------------- compare
def _rel(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), 1e-12)


def _grad_diffs(names_a: list, ga: list, names_b: list, gb: list) -> tuple[dict[str, float], float, str]:
    """Per-tensor ||gA - gB|| / ||gA|| and the same over all tensors, matched by name (by position when
    the names differ but the count and shapes agree: a renamed attribute)."""
    import torch

    note = ""
    if names_a == names_b:
        pairs = list(zip(names_a, ga, gb))
    elif sorted(names_a) == sorted(names_b):
        index = {n: i for i, n in enumerate(names_b)}
        pairs = [(n, g, gb[index[n]]) for n, g in zip(names_a, ga)]
        note = "matched by name (different order)"
    elif len(ga) == len(gb) and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape) for x, y in zip(ga, gb)
    ):
        pairs = list(zip(names_a, ga, gb))
        note = "names differ: matched by position (same count and shapes)"
    else:
        missing = sorted(set(names_a) ^ set(names_b))
        return {"<parameter sets differ>": math.inf}, math.inf, f"parameters differ: {missing[:5]}"
    per, num, den = {}, 0.0, 0.0
    for name, a, b in pairs:
        if a is None and b is None:
            per[name] = 0.0
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if a.shape != b.shape:
            per[name] = math.inf
            continue
        d = float((a.double() - b.double()).norm())
        n = float(a.double().norm())
        per[name] = 0.0 if d == 0 else (d / n if n > 0 else math.inf)
        num, den = num + d * d, den + n * n
    overall = 0.0 if num == 0 else (math.sqrt(num) / math.sqrt(den) if den > 0 else math.inf)
    return per, overall, note


def compare(args: argparse.Namespace) -> int:
    import torch

    A, B = (torch.load(p, weights_only=True) for p in (args.a, args.b))
    tol, failed = args.tol, []

    def row(label: str, value: float, checked: bool = True) -> None:
        bad = checked and not value <= tol
        if bad:
            failed.append(label)
        flag = "FAIL" if bad else ("ok" if checked else "info")
        print(f"  {label:<44} {value:.3e}  {flag}")

    print(f"A: {args.a}\nB: {args.b}\ntolerance: {tol:g} (relative)")
    sa, sb = A.get("start", {}), B.get("start", {})
    same_start = sa.get("weights_sha256") == sb.get("weights_sha256")
    print(f"  {'initial policy weights':<44} {'identical' if same_start else 'DIFFERENT'}")
    if not same_start:
        failed.append("initial policy weights")
    ta, tb = sa.get("torch_threads"), sb.get("torch_threads")
    if ta != tb:
        print(f"  warning: torch threads differ ({ta} vs {tb}): float reductions may differ")
    fa, fb = A["first_update"], B["first_update"]
    if fa is None or fb is None:
        print("  first update: missing in " + ("A" if fa is None else "B"))
        failed.append("first update")
    else:
        for key, label in (("grads", "first-update gradients (before clipping)"), ("grads_clipped", "clipped")):
            per, overall, note = _grad_diffs(fa["names"], fa[key], fb["names"], fb[key])
            worst = max(per, key=per.get) if per else ""
            print(f"  {label}: {len(per)} tensors" + (f" ({note})" if note else ""))
            row("  overall ||gA-gB||/||gA||", overall, key == "grads")
            row(f"  max per tensor ({worst})", max(per.values(), default=0.0), key == "grads")
            if args.verbose and key == "grads":
                for name, value in per.items():
                    print(f"      {name:<60} {value:.3e}")
        if fa.get("grads_source") != fb.get("grads_source"):
            print(f"  note: gradients taken as '{fa.get('grads_source')}' vs '{fb.get('grads_source')}'")
        row("first-update loss", _rel(fa.get("loss"), fb.get("loss")))
        row("first-update grad norm (before clipping)", _rel(fa.get("grad_norm"), fb.get("grad_norm")), False)
    steps_a, steps_b = A["steps"], B["steps"]
    if len(steps_a) != len(steps_b):
        print(f"  training steps: {len(steps_a)} vs {len(steps_b)}")
        failed.append("number of training steps")
    n = min(len(steps_a), len(steps_b))
    names = sorted(
        set().union(*(s["metrics"] for s in steps_a[:n])) | set().union(*(s["metrics"] for s in steps_b[:n]))
    )
    print(f"per-step logged metrics over {n} updates (max over steps of |a-b|/max(|a|,1e-12)):")
    for name in names:
        checked = name in CHECKED_METRICS
        if not (checked or args.verbose or name in SHOWN_METRICS):
            continue
        diffs = [_rel(sa_["metrics"].get(name), sb_["metrics"].get(name)) for sa_, sb_ in zip(steps_a[:n], steps_b[:n])]
        worst = max(range(n), key=diffs.__getitem__) if n else 0
        row(f"{name} (worst at update {worst})", max(diffs, default=0.0), checked)
    if failed:
        print(f"NOT EQUIVALENT: {', '.join(failed)}")
        return 1
    print("EQUIVALENT within tolerance")
    return 0


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="run train.py fit and record a dump; extra train.py flags after --")
    d.add_argument("--config", required=True)
    d.add_argument("--out", required=True, help="directory; the dump is OUT/NAME.pt")
    d.add_argument("--name", default=None, help="default: the config's stem")
    d.add_argument("--steps", type=int, default=20, help="policy updates (trainer.max_steps)")
    d.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the run (0: leave the environment's)")
    d.add_argument("--cache", default=None, help="LIT_ALIGN_CACHE of the run (default: the environment's)")
    d.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    c = sub.add_parser("compare", help="compare two dumps; exit 1 if a difference exceeds --tol")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--tol", type=float, default=1e-6)
    c.add_argument("-v", "--verbose", action="store_true", help="every tensor and every logged metric")
    args = parser.parse_args(argv)
    if args.command == "dump":
        return dump(args, extra)
    if extra:
        parser.error("compare takes no arguments after --")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
