"""How a GRPO training step's time grows with G, with max new tokens and with model size.

    python benchmarks/scaling.py --out benchmarks/results/scaling
    python benchmarks/scaling.py --quick --out /tmp/scaling     # smoke test

From a base setting (``--prompts`` prompts, G = 8, 32 new tokens, the 14.2M-parameter Llama), one
knob is varied at a time; every completion is exactly max new tokens long (``--ignore-eos``). Each
point is ``benchmarks/throughput.py``'s measurement of GRPO in a fresh process. Writes
``<out>/scaling.md`` (a markdown table with the date and the command) and ``<out>/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

BASE = {"G": 8, "max_new_tokens": 32, "size": (384, 6, 6)}
GRID = {
    "G": [4, 8, 16, 32],
    "max_new_tokens": [8, 16, 32, 48],
    "size": [(128, 4, 4), (256, 6, 4), (384, 6, 6), (512, 8, 8)],  # (hidden, layers, heads)
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per measuring process (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling")
    p.add_argument("--quick", action="store_true", help="smoke test: two points per knob, tiny models")
    a = p.parse_args()
    base, grid = dict(BASE), {k: list(v) for k, v in GRID.items()}
    if a.quick:
        a.prompts, a.steps, a.warmup = 2, 1, 1
        base = {"G": 4, "max_new_tokens": 8, "size": (64, 2, 2)}
        grid = {"G": [2, 4], "max_new_tokens": [4, 8], "size": [(64, 2, 2), (128, 2, 2)]}
    rows, seen = [], {}
    for knob, values in grid.items():
        for value in values:
            point = dict(base, **{knob: value})
            key = (point["G"], point["max_new_tokens"], point["size"])
            if key not in seen:
                hidden, layers, heads = point["size"]
                args = argparse.Namespace(
                    model=throughput.bench_checkpoint(hidden, layers, heads),
                    prompts=a.prompts,
                    G=point["G"],
                    max_new_tokens=point["max_new_tokens"],
                    steps=a.steps,
                    warmup=a.warmup,
                    lr=1e-5,
                    temperature=1.0,
                    accelerator="auto",
                    seed=0,
                    loss_aggregation="token-mean",
                    expert_batch_size=None,
                    threads=a.threads,
                    ignore_eos=True,
                    prompt_data=None,
                )
                seen[key] = dict(throughput.measure_in_subprocess("grpo", args), size=f"h{hidden}-l{layers}")
                r = seen[key]
                print(f"{knob}={value}: {r['step_s']:.2f} s/step, {r['completion_tokens_per_s']:.0f} tok/s", flush=True)
            rows.append(dict(seen[key], varied=knob))
    lines = [
        "| varied | G | max new tokens | parameters | s / step | generation s | scoring s | training s "
        "| completion tokens / step | completion tokens / s | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['varied']} | {r['G']} | {r['max_new_tokens']} | {r['parameters'] / 1e6:.1f}M ({r['size']}) "
            f"| {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['scoring_s']:.3f} | {r['training_s']:.2f} "
            f"| {r['completion_tokens_per_step']:.0f} | {r['completion_tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    r0, loads = rows[0], [r["load_avg_1m"] for r in rows]
    header = (
        f"GRPO training steps on {r0['device']} ({r0['torch_threads']} torch threads), {a.prompts} prompts per step, "
        f"{a.warmup} warm-up + {a.steps} timed steps per point, one knob varied at a time from G = {base['G']}, "
        f"{base['max_new_tokens']} new tokens, h{base['size'][0]}-l{base['size'][1]}; every completion exactly max "
        f"new tokens long; {r0['cpu_count']} cores, 1-min load average "
        f"{min(loads):.1f} to {max(loads):.1f}; measured {date.today()} with "
        f"`{throughput.command_line()}`.\n\n"
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scaling.md").write_text(header + "\n".join(lines) + "\n")
    (a.out / "scaling.json").write_text(
        json.dumps({"date": str(date.today()), "command": throughput.command_line(), "runs": rows}, indent=1) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
