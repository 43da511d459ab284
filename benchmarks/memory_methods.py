"""Peak memory of each method's GSM8K recipe (configs/math_*.yaml) at a real vocabulary, on the same data.

    python benchmarks/memory_methods.py --out benchmarks/results/memory_methods     # the five recipes
    python benchmarks/memory_methods.py --configs math_chord_phi math_hpt --steps 2  # a subset
    python benchmarks/memory_methods.py --quick --out /tmp/mm                       # smoke test (CI)

Every recipe runs as a user runs it, ``python train.py fit --config configs/<name>.yaml``, offline, in a
fresh process, one after another, with the same overrides: the checkpoint, the data, the sizes below, no
validation (measured on its own: ``benchmarks/memory_scale.py --validation``), no checkpointing. Everything
else (method settings, rewards, G = 8, ``steps_per_generation``, learning rate, ...) is the config's.

- The checkpoint: built here, nothing downloaded, by ``benchmarks/memory_scale.py``'s builders: a freshly
  initialised Qwen2 with Qwen2.5's vocabulary size (151,936, tied embeddings; hidden 256, 4 layers, 4 heads,
  2 KV heads, intermediate 512: 41M parameters, 39M of them the embedding) and a 151,936-entry byte-level BPE
  tokenizer with Qwen2-Instruct's ChatML template whose merges spell the data's text.
- The data: ``--rows`` GSM8K-format rows (``question``; ``answer`` a worked solution with calculator
  annotations ending ``#### N``) from ``tests/_gsm8k.py``, the rows the recipes' offline tests train on.
  One JSONL is the prompt file of every recipe (each question's worked solution its demonstration) and
  CHORD's expert file.
- The sizes: ``--prompts`` prompts per step (``data.prompt_batch_size``), ``model.max_new_tokens`` =
  ``data.max_response_length`` = ``--tokens``, ``model.micro_batch_size`` = ``--micro-batch-size`` (the
  configs' 4), CHORD's ``data.expert_batch_size`` = prompts x G / 4 (its config's share: 32 expert rows
  beside 16 x 8 rollouts), ``--steps`` optimizer steps (``trainer.max_steps``).

A random checkpoint almost never samples its end token (1 of 151,936), so completions run to max new
tokens; the mean length actually generated is reported. Per recipe: ``baseline_peak_gib``, the process's
peak RSS (ru_maxrss) at the trainer's set-up (model and data loaded); ``peak_at_train_start_gib`` (the
optimizer built); ``peak_after_step_gib``, its peak after each optimizer step; ``peak_gib``, its peak over
the run (from the parent's ``wait4``, so there even when the process is killed); ``update_gib`` = peak -
baseline; the most rows and positions (rows x width) in one forward with gradient (training) and without
(sampling, old log-probs); and the logged means of the method's own metrics (what the updates trained on:
demonstration tokens, prefix tokens, prompts routed to SFT). The parent reads the child's VmRSS every 50 ms
and kills it above ``--max-gb``. Writes <out>/memory_methods.json and memory_methods.md, prints the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_scale  # noqa: E402  (its checkpoint builders, guard and probes)

CONFIGS = ("math_chord_phi", "math_luffy", "math_srft", "math_hpt", "math_prefix_rft")
GIB = 2**30
# the logged means reported per recipe (those a run logs): what its updates trained on
METHOD_METRICS = (
    "train/completion_length",
    "train/off_policy_token_share",
    "train/prefix_token_share",
    "train/gate_sft_share",
    "train/srft_w_sft",
    "train/mu",
)


def gsm8k_rows(n: int) -> list[dict]:
    """The tests' GSM8K-format rows (tests/_gsm8k.py), loaded by path: benchmarks/ and tests/ are no packages."""
    spec = importlib.util.spec_from_file_location("_gsm8k", ROOT / "tests" / "_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gsm8k_rows(n)


def system_prompts() -> list[str]:
    """The recipes' system prompts (their tokens are in every prompt)."""
    import yaml

    out = []
    for name in CONFIGS:
        config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        prompt = config["data"]["init_args"].get("system_prompt")
        if prompt:
            out.append(prompt)
    return out


def build_assets(directory: Path, a: argparse.Namespace) -> None:
    """``model/`` (checkpoint and tokenizer) and ``gsm8k.jsonl``."""
    rows = gsm8k_rows(a.rows)
    texts = ["system\nYou are a helpful assistant.\n", "user\n", "assistant\n", *system_prompts()]
    texts += [t for r in rows for t in r.values()]
    tok = memory_scale.build_tokenizer(a.vocab, texts)
    memory_scale.save_qwen2(directory / "model", tok, a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate)
    memory_scale.check_tokenizer(directory / "model", tok, rows[0]["question"], rows[0]["answer"])
    (directory / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def ensure_assets(a: argparse.Namespace) -> dict:
    """Build the assets once into the lit_align cache (keyed by shape and rows); their paths."""
    from lit_align.data import embedded

    name = f"qwen2-v{a.vocab}-h{a.hidden}-l{a.layers}-a{a.heads}-kv{a.kv_heads}-i{a.intermediate}-rows{a.rows}"
    target = embedded._atomic_dir(
        embedded.cache_dir() / "bench" / "memory_methods" / name, lambda d: build_assets(d, a)
    )
    return {"model": str(target / "model"), "data": str(target / "gsm8k.jsonl")}


# ----------------------------------------------------------------------------- inside a measuring process
class Probe(L.Callback):
    """Writes the process's peaks at set-up, at train start and after every optimizer step, and the forward
    counts of :class:`memory_scale.ForwardProbe`, to ``out`` (JSON) as they come: a process killed later
    still leaves what it had reached."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.seen: dict = {"peak_after_step_gib": []}
        self.forwards = None

    def save(self) -> None:
        if self.forwards is not None:
            self.seen["forwards"] = self.forwards.stats
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.seen))
        os.replace(tmp, self.out)

    def setup(self, trainer, pl_module, stage) -> None:
        import torch

        self.seen.update(
            baseline_peak_gib=memory_scale.peak_gib(),
            parameters=sum(p.numel() for p in pl_module.model.parameters()),
            torch_threads=torch.get_num_threads(),
            module=type(pl_module).__name__,
            micro_batch_size=pl_module.hparams.micro_batch_size,
            generation_batch_size=pl_module.hparams.generation_batch_size,
            num_generations=pl_module.hparams.num_generations,
            steps_per_generation=pl_module.hparams.steps_per_generation,
        )
        self.forwards = memory_scale.ForwardProbe(pl_module.model)
        self.save()

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen["peak_at_train_start_gib"] = memory_scale.peak_gib()
        self.start = time.perf_counter()
        self.save()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen["peak_after_step_gib"].append(memory_scale.peak_gib())
        self.save()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen.update(steps_done=trainer.global_step, train_s=time.perf_counter() - self.start, done=True)
        self.save()


# ----------------------------------------------------------------------------- the parent
def overrides(config: str, a: argparse.Namespace, assets: dict, work: Path) -> list[str]:
    """The flags every recipe gets (CHORD also its expert file and expert rows)."""
    flags = [
        f"--trainer.max_steps={a.steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={work / config}",
        f"--model.init_args.model_name_or_path={assets['model']}",
        f"--model.init_args.max_new_tokens={a.tokens}",
        f"--model.init_args.micro_batch_size={a.micro_batch_size}",
        f"--data.init_args.prompt_data={assets['data']}",
        "--data.init_args.val_data=null",
        f"--data.init_args.prompt_batch_size={a.prompts}",
        f"--data.init_args.max_response_length={a.tokens}",
        "--trainer.callbacks+=memory_methods.Probe",
        f"--trainer.callbacks.out={work / f'{config}.json'}",
    ]
    if a.G is not None:
        flags.append(f"--model.init_args.num_generations={a.G}")
    if config == "math_chord_phi":
        G = a.G or 8
        flags += [
            f"--data.init_args.expert_data={assets['data']}",
            f"--data.init_args.expert_batch_size={max(1, a.prompts * G // 4)}",
        ]
    return flags


def measure(config: str, a: argparse.Namespace, assets: dict, work: Path) -> dict:
    from lit_align.events import read_scalars

    cmd = [sys.executable, "train.py", "fit", "--config", f"configs/{config}.yaml", *overrides(config, a, assets, work)]
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(ROOT)]),
    }
    if a.threads > 0:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    log = work / f"{config}.log"
    guard = memory_scale.run_guarded(cmd, a.max_gb, log, env, a.timeout_min * 60 if a.timeout_min else None)
    run: dict = {"config": config, **guard}
    probe = work / f"{config}.json"
    run.update(json.loads(probe.read_text()) if probe.exists() else {})
    if guard["killed_at_gib"] is not None:
        run["status"] = f"killed at {guard['killed_at_gib']:.1f} GiB"
    elif guard["timed_out"]:
        run["status"] = f"timed out after {a.timeout_min} min"
    elif guard["returncode"] != 0 or not run.get("done"):
        run["status"] = f"failed (exit {guard['returncode']})"
        run["log_tail"] = log.read_text()[-3000:]
    else:
        run["status"] = "ok"
        run["update_gib"] = run["peak_gib"] - run["baseline_peak_gib"]
    if (work / config).exists():
        scalars = read_scalars(work / config)
        run["logged_means"] = {
            k: sum(v for _, v in scalars[k]) / len(scalars[k]) for k in METHOD_METRICS if scalars.get(k)
        }
        run["logged_steps"] = len(scalars.get("train/loss", []))
    return run


def _gib(x) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown(result: dict) -> str:
    m, s = result["model"], result["settings"]
    G = s["G"] or next((r["num_generations"] for r in result["runs"] if "num_generations" in r), "the config's G")
    chord = next((r for r in result["runs"] if r["config"] == "math_chord_phi" and r["status"] == "ok"), None)
    lines = [
        f"Measured {result['date']} on {result['machine']} (lit_align {result['lit_align_commit']}, torch "
        f"{result['torch_version']}, {s['threads'] or 'default'} torch thread(s) per process) with "
        f"`{result['command']}`.",
        "",
        f"A freshly initialised Qwen2, {m['parameters'] / 1e6:.1f}M parameters: vocabulary {m['vocab']:,} "
        f"(tokenizer: {m['vocab']:,} entries, ChatML template), hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']} heads / {m['kv_heads']} KV heads, intermediate {m['intermediate']}, tied embeddings, fp32. "
        f"Each recipe: `python train.py fit --config configs/<config>.yaml` in a fresh process, {s['steps']} "
        f"optimizer steps of {s['prompts']} GSM8K-format prompts x G = {G} rollouts, max new "
        f"tokens {s['tokens']}, model.micro_batch_size {s['micro_batch_size']}, the config's other settings; "
        f"CHORD: prompts x G / 4 expert rows from the same file. Peak = the process's ru_maxrss (wait4); "
        f"baseline = its peak at the trainer's set-up (model and data loaded); update = peak - baseline. "
        f"Rows / forward: the most rows in one forward with gradient (training) and without (sampling, "
        f"old log-probs).",
        "",
        "| config | method | mean completion length | rows / forward (training, no-grad) | baseline peak (GiB) "
        "| at train start | after step 1 | peak (GiB) | update (GiB) | update vs CHORD | logged means | s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        f = r.get("forwards")
        rows = f"{f['train']['max_rows']}, {f['nograd']['max_rows']}" if f else ""
        means = dict(r.get("logged_means", {}))
        length = means.pop("train/completion_length", None)
        shown = ", ".join(f"{k.removeprefix('train/')} {v:.3g}" for k, v in means.items())
        after = r.get("peak_after_step_gib") or [None]
        vs = ""
        if chord and r["status"] == "ok":
            vs = f"{r['update_gib'] / chord['update_gib']:.2f}x"
        lines.append(
            f"| {r['config']} | {r.get('module', '')} | {'' if length is None else f'{length:.1f}'} | {rows} "
            f"| {_gib(r.get('baseline_peak_gib'))} | {_gib(r.get('peak_at_train_start_gib'))} | {_gib(after[0])} "
            f"| {_gib(r['peak_gib']) if r['status'] == 'ok' else ''} | {_gib(r.get('update_gib'))} | {vs} "
            f"| {shown} | {r['wall_s']:.0f} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def apply_quick(a: argparse.Namespace) -> None:
    """A tiny body at the real vocabulary: seconds per recipe."""
    a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate = 32, 2, 2, 1, 64
    a.tokens, a.prompts, a.G, a.micro_batch_size, a.steps, a.rows = 8, 2, 4, 2, 2, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per recipe (trainer.max_steps)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (data.prompt_batch_size)")
    p.add_argument("--G", type=int, default=None, help="completions per prompt (default: the configs' 8)")
    p.add_argument("--tokens", type=int, default=256, help="max new tokens (and max response length)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="model.micro_batch_size (the configs' 4)")
    p.add_argument("--rows", type=int, default=64, help="GSM8K-format rows in the data file")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-gb", type=float, default=10.0, help="kill a measuring process above this RSS (GiB)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="kill a measuring process after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measuring process (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke test: hidden 32, 2 layers, 8 tokens, 2 x 4, 2 steps")
    p.add_argument("--out", type=Path, default=None, help="write <out>/memory_methods.json and memory_methods.md")
    a = p.parse_args()
    if a.quick:
        apply_quick(a)

    assets = ensure_assets(a)
    runs = []
    with tempfile.TemporaryDirectory(prefix="memory_methods-") as tmp:
        for config in a.configs:  # one after another: each process's peak is its own
            run = measure(config, a, assets, Path(tmp))
            runs.append(run)
            print(
                f"{config}: {run['status']}, peak {run.get('peak_gib', 0):.2f} GiB "
                f"(baseline {run.get('baseline_peak_gib') or 0:.2f})",
                file=sys.stderr,
                flush=True,
            )
    result = {
        **memory_scale.run_header(a, assets, next((r["parameters"] for r in runs if "parameters" in r), None)),
        "settings": {
            k: getattr(a, k)
            for k in ("configs", "steps", "prompts", "G", "tokens", "micro_batch_size", "rows", "max_gb", "threads")
        },
        "runs": runs,
    }
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "memory_methods.json").write_text(json.dumps(result, indent=1) + "\n")
        (a.out / "memory_methods.md").write_text(markdown(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
