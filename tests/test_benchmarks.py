"""The throughput benchmarks: our GRPO loss equals TRL's, and the --quick variants print sane JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trl import trl_loss

from lit_align import losses

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- loss equivalence with TRL
def _fixed_batch(seed: int = 0, rows: int = 6, tokens: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 3
    old_logp = logp + 0.4 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)  # ratios well outside 1 +- 0.2
    ref_logp = logp + 0.3 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])[:rows]  # every row has tokens; lengths differ
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).long()
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    return {"logp": logp, "old_logp": old_logp, "ref_logp": ref_logp, "mask": mask, "adv": adv}


def _trl_loss(b: dict, loss_type: str, eps_low: float, eps_high: float, beta: float) -> tuple:
    """TRL's own GRPOTrainer._compute_loss on the batch (tests/_trl.py) and its gradient."""
    logp = b["logp"].clone().requires_grad_(True)
    loss = trl_loss(
        logp,
        b["old_logp"],
        b["mask"],
        b["adv"],
        ref_logp=b["ref_logp"],
        loss_type=loss_type,
        epsilon=eps_low,
        epsilon_high=eps_high,
        beta=beta,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def _our_loss(b: dict, aggregation: str, eps_low: float, eps_high: float, beta: float) -> tuple:
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = losses.clipped_surrogate(
        logp,
        b["old_logp"],
        b["adv"],
        b["mask"],
        eps_low,
        eps_high,
        aggregation,
        ref_logp=b["ref_logp"] if beta > 0 else None,
        beta=beta,
        kl_estimator="k3",
    )
    assert 0 < metrics["clip_ratio"] < 1  # both branches of the clipped min are exercised
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


# ours -> TRL's loss_type, and the constant that separates them (dr_grpo divides the token sum by
# rows x max_completion_length; our seq-mean-token-sum divides it by rows)
MATCHES = [
    ("token-mean", "dapo", 1.0),
    ("token-mean", "bnpo", 1.0),
    ("seq-mean-token-mean", "grpo", 1.0),
    ("seq-mean-token-sum", "dr_grpo", 7.0),
]


@pytest.mark.parametrize("aggregation,loss_type,scale", MATCHES, ids=[m[1] for m in MATCHES])
@pytest.mark.parametrize("eps_high,beta", [(0.2, 0.0), (0.28, 0.0), (0.2, 0.04)], ids=["sym", "dapo-clip", "kl-k3"])
def test_our_grpo_loss_equals_trls(aggregation, loss_type, scale, eps_high, beta):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'lit-align[bench]')")
    b = _fixed_batch()
    ours, our_grad = _our_loss(b, aggregation, 0.2, eps_high, beta)
    theirs, their_grad = _trl_loss(b, loss_type, 0.2, eps_high, beta)
    assert ours.item() != 0.0
    torch.testing.assert_close(ours / scale, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad / scale, their_grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the --quick variants
def _run_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_run(run: dict) -> None:
    for key in (
        "completion_tokens_per_s",
        "step_s",
        "generation_s",
        "training_s",
        "peak_rss_mib",
        "parameters",
        "completion_tokens_per_step",
    ):
        assert run[key] > 0, (key, run)
    assert run["scoring_s"] >= 0
    assert run["generation_s"] + run["scoring_s"] <= run["step_s"] * 1.001
    assert run["timed_steps"] == run["steps"] == len(run["per_step_s"])


def test_throughput_quick_prints_json():
    out = _run_json("benchmarks/throughput.py", "--quick", "--in-process")
    assert out["command"].startswith("python benchmarks/throughput.py") and out["date"]
    assert [r["method"] for r in out["runs"]] == ["grpo", "chord"]
    for run in out["runs"]:
        _check_run(run)
    assert out["runs"][0]["expert_rows"] == 0 and out["runs"][1]["expert_rows"] > 0


def test_compare_trl_quick_measures_both_length_modes(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'lit-align[bench]')")
    out = _run_json("benchmarks/compare_trl.py", "--quick", "--out", str(tmp_path))
    assert [(r["method"], r["lengths"], r["ignore_eos"]) for r in out["runs"]] == [
        ("grpo", "fixed", True),
        ("trl_grpo", "fixed", True),
        ("grpo", "free", False),
        ("trl_grpo", "free", False),
    ]
    for run in out["runs"]:
        _check_run(run)
        assert run["parameters"] == out["parameters"] and run["prompt_tokens_per_step"] > 0
        # FLOP accounting: 2 N (generation) and 6 N (training) per prompt or completion token, the LM head's
        # parameters only per completion token (logits are needed there only)
        tokens = run["prompt_tokens_per_step"] + run["completion_tokens_per_step"]
        head = run["head_parameters"]
        assert 0 < head < run["linear_parameters"]
        per_forward = (run["linear_parameters"] - head) * tokens + head * run["completion_tokens_per_step"]
        assert run["training_gflop_per_step"] == pytest.approx(3 * run["generation_gflop_per_step"])
        assert run["generation_gflop_per_step"] == pytest.approx(2 * per_forward / 1e9)
        assert run["matmul_gflops_training_shapes"] > 0 and run["matmul_gflops_decoding_shapes"] > 0
    fixed = [r for r in out["runs"] if r["lengths"] == "fixed"]
    assert all(r["completion_tokens_per_step"] == r["prompts"] * r["G"] * r["max_new_tokens"] for r in fixed)
    for mode in ("fixed", "free"):
        m = out["lengths"][mode]
        ratio = m["ratio_tokens_per_s"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert 0 < m["trl_step_at_matmul_rate_s"] < m["median"]["trl"]["step_s"] and m["max_speedup_over_trl"] > 1
    table = (tmp_path / "compare_trl.md").read_text()
    assert (
        "fixed-length: min" in table and "free-length, TRL" in table and "no implementation of the same math" in table
    )


def test_methods_quick_writes_the_table_and_the_plot(tmp_path):
    """--quick (CI): all ten methods from the instruct-like base, every axis in the table and in methods.json,
    SFT-then-GRPO at three switch points with the best one chosen."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/methods.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "methods.md").read_text()
    methods = ["sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi", "amft", "luffy", "srft", "hpt", "prefix_rft"]
    for m in methods:
        assert f"\n| {m} |" in table, m
    assert "1 torch thread" in table and "whole benchmark" in table
    assert "starts from the instruct-like base checkpoint of each seed" in table and "| start checkpoint |" in table
    header = table.split("| method |", 1)[1].split("\n", 1)[0]
    columns = [
        "val/accuracy @25%",
        "val/accuracy @50%",
        "val/accuracy @100%",
        "val/retention/reversal",
        "drop reversal",
        "val/retention/subtraction",
        "drop subtraction",
        "val/expert_nll_correct",
        "val/pass@1",
        "val/pass@16",
    ]
    for column in columns:
        assert f" {column} |" in header, column
    # every method's row has a number in every column (no run left a column empty)
    for m in methods:
        row = table.split(f"\n| {m} |", 1)[1].split("\n", 1)[0]
        cells = [c.strip() for c in row.split("|")[:-1]]
        assert len(cells) == len(columns) + 1 and all(c and c != "nan" for c in cells), (m, cells)
    start = json.loads((tmp_path / "start.json").read_text())  # one start checkpoint per seed
    assert set(start) == {"0"}
    assert {"val/accuracy", "val/retention/subtraction", "val/retention/reversal", "val/pass@1", "val/pass@16"} <= set(
        start["0"]
    )
    runs = json.loads((tmp_path / "methods.json").read_text())
    assert sorted(r["method"] for r in runs) == sorted(methods) and all(r["steps"] == 8 for r in runs)
    for r in runs:  # validation after updates 2, 4, 6, 8: the 25 / 50 / 100% points are read, not missing
        assert [s for s, _ in r["accuracy_curve"]] == [1, 3, 5, 7]
        assert r["accuracy_at"] == {
            "25%": r["accuracy_curve"][0][1],
            "50%": r["accuracy_curve"][1][1],
            "100%": r["accuracy_curve"][3][1],
        }
        assert set(r["final_retention"]) == {"subtraction", "reversal"}
        assert all(0 <= v <= 1 for v in r["final_retention"].values())
        assert set(r["final_pass"]) == {"1", "16"} and r["final_pass"]["1"] <= r["final_pass"]["16"]
    switch = json.loads((tmp_path / "switch.json").read_text())
    assert sorted(r["switch"] for r in switch) == [0.125, 0.25, 0.5]
    chosen = [r for r in runs if r["method"] == "sft_then_grpo"]
    assert len(chosen) == 1 and chosen[0]["switch"] in (0.125, 0.25, 0.5)
    assert chosen[0]["final_accuracy"] == max(r["final_accuracy"] for r in switch)
    assert "SFT-then-GRPO's switch point, tried on seed 0" in table and table.count("| yes |") == 1
    for share in ("0.125", "0.25", "0.5"):  # one run directory per switch point (sft_steps 1, 2, 4 of 8)
        assert (tmp_path / "runs" / f"sft_then_grpo-switch{share}-seed0").is_dir()
    assert (tmp_path / "curves.png").stat().st_size > 0


def _methods_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("methods", ROOT / "benchmarks" / "methods.py")
    methods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(methods)
    return methods


@pytest.mark.parametrize(
    "switch_points",
    [["0.25", "0.25"], ["0.25", "0.3"], ["0.1"]],  # the same SFT stage twice (8 updates: 2 and 2), or none (0)
)
def test_methods_rejects_switch_points_that_repeat_or_give_no_sft_update(tmp_path, switch_points):
    """Each switch point is one SFT-then-GRPO run into its own directory: a repeated one ran twice into the
    same directory (its event files then read back merged, a row per copy), and one under 1 / --steps ran
    0 SFT updates, plain GRPO under SFT-then-GRPO's name. Refused before any training."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/methods.py", "--quick", "--methods", "sft_then_grpo", "--out", str(tmp_path)]
        + ["--switch-points", *switch_points],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--switch-points" in proc.stderr and "SFT updates" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def _methods(tmp_path, *flags, timeout=180):
    return subprocess.run(
        [sys.executable, "benchmarks/methods.py", "--quick", "--out", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_methods_refuses_an_out_that_holds_its_runs_and_from_runs_without_any(tmp_path):
    """A second invocation into the same --out wrote a second version into each run directory, read back merged
    with the first (old pass@k columns beside new ones): refused before any work. --from-runs where no run
    reached --steps names the folder instead of an IndexError."""
    (tmp_path / "runs" / "grpo-seed0" / "grpo" / "version_0").mkdir(parents=True)
    proc = _methods(tmp_path, "--methods", "grpo")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "already holds 1 of this invocation's run directories" in proc.stderr and "grpo-seed0" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["grpo-seed0"], "nothing else written"
    proc = _methods(tmp_path, "--methods", "grpo", "--from-runs")
    assert proc.returncode == 2 and "no run under" in proc.stderr and "reached --steps 8" in proc.stderr


def test_methods_stops_at_the_first_failed_run(tmp_path):
    """A run that fails stops the benchmark at once, naming the run and train.py's error: the queued runs are not
    started (they ran to the end before the error was shown). Here the first start-checkpoint validation fails on
    a flag train.py refuses, and the second seed's, queued behind it, never starts."""
    proc = _methods(tmp_path, "--methods", "sft", "--seeds", "0", "1", "--jobs", "1", "--model.init_args.nosuch=1")
    assert proc.returncode != 0
    assert "validating embedded-instruct-0 failed" in proc.stderr and "nosuch" in proc.stderr, proc.stderr[-2000:]
    assert "`--from-runs` summarises" in proc.stderr
    assert not (tmp_path / "runs" / "start-instruct-seed1").exists(), "the queued run was not started"


def test_methods_sigterm_ends_its_train_py_processes(tmp_path):
    """SIGTERM to the benchmark ended it alone: its train.py processes ran on to the end, orphaned."""
    import os
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "benchmarks/methods.py", "--quick", "--methods", "sft", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: list[int] = []
    deadline = time.monotonic() + 60
    while not children and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        children = [int(pid) for pid in found]
    assert children, "the benchmark started no train.py process"
    time.sleep(1.0)  # the child is running (importing torch), not only forked
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped: the runs that finished" in stderr, stderr[-2000:]
    for pid in children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}/status").exists() else ""
        assert "zombie" in status, f"train.py process {pid} outlived the benchmark"


def test_methods_chooses_the_switch_point_and_measures_drops_per_seed():
    methods = _methods_module()

    def run(seed, switch, acc, ret, method="sft_then_grpo"):
        return {
            "method": method,
            "seed": seed,
            "switch": switch,
            "final_accuracy": acc,
            "accuracy_at": {"25%": acc, "50%": acc, "100%": acc},
            "final_retention": {"sub": ret},
            "final_pass": {"1": acc, "16": 1.0},
            "final_expert_nll_correct": 0.1,
            "wall_s": 1.0,
            "meta_grads": [],
        }

    cands = [run(0, 0.125, 0.80, 0.9), run(0, 0.25, 0.85, 0.5), run(0, 0.5, 0.85, 0.7)]
    # best final accuracy; of the two at 0.85, the higher retention
    assert methods.choose_switch(cands)["switch"] == 0.5
    runs = [*cands, run(1, 0.5, 0.8, 0.6), run(1, 0.25, 0.9, 0.6), run(0, None, 0.7, 0.8, "grpo")]
    table, tried = methods.split_switch(runs, tuning_seed=0)
    assert tried == cands
    assert [(r["method"], r["seed"], r["switch"]) for r in table] == [
        ("sft_then_grpo", 0, 0.5),
        ("sft_then_grpo", 1, 0.5),
        ("grpo", 0, None),
    ]
    # each run's drop is against its own seed's start checkpoint (JSON keys: strings)
    drop = methods.axes(table, {"0": {"val/retention/sub": 1.0}, "1": {"val/retention/sub": 0.9}})["drop sub"]
    assert [round(drop(r), 6) for r in table] == [0.3, 0.3, 0.2]
    text = methods.summarise(
        table,
        ["sft_then_grpo", "grpo"],
        {0: {"val/retention/sub": 1.0, "val/accuracy": 0.5}, 1: {"val/retention/sub": 0.9, "val/accuracy": 0.7}},
    )
    assert "| start checkpoint | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.950 ± 0.071 |" in text
    assert " val/pass@1 | val/pass@16 | wall time (s) |" in text
    switch = methods.switch_table(cands, 400)
    assert "| 200 (0.5) | 0.850 | 0.850 | 0.850 | 0.700 | 0.850 | 1.000 | yes |" in switch
    assert switch.count("yes") == 1


@pytest.mark.parametrize("ks", [[], ["1", "16"]])
def test_methods_switch_table_has_one_cell_per_column_with_or_without_pass_at_k(ks):
    """--pass-at-k with no k logs no val/pass@k: the switch table's header then had an empty cell more than
    its delimiter row, which Markdown does not render as a table."""
    methods = _methods_module()
    cands = [
        {
            "method": "sft_then_grpo",
            "seed": 0,
            "switch": switch,
            "final_accuracy": acc,
            "accuracy_at": {"25%": acc, "50%": acc, "100%": acc},
            "final_retention": {"sub": 0.5},
            "final_pass": {k: acc for k in ks},
        }
        for switch, acc in ((0.25, 0.5), (0.5, 0.7))
    ]
    rows = [line for line in methods.switch_table(cands, 8).splitlines() if line.startswith("|")]
    assert len(rows) == 4
    assert {line.count("|") for line in rows} == {len(ks) + 7}, rows
    assert all("|  |" not in line for line in rows[:2]), rows


def test_methods_flags_pairs_more_than_two_seed_stds_apart():
    methods = _methods_module()

    def run(m, acc, ret):
        return {
            "method": m,
            "accuracy_at": {"25%": acc, "50%": acc, "100%": acc},
            "final_retention": {"sub": ret},
            "final_expert_nll_correct": 0.1,
            "wall_s": 1.0,
            "meta_grads": [],
        }

    runs = [
        run("a", 0.50, 0.9),
        run("a", 0.52, 0.8),
        run("a", 0.54, 0.7),
        run("b", 0.60, 0.85),
        run("b", 0.61, 0.75),
        run("b", 0.62, 0.80),
    ]
    lines = methods.separated(runs, ["a", "b"], {"val/retention/sub": 1.0})
    # accuracy: |0.61 - 0.52| = 0.09 > 2 x 0.02; retention: |0.80 - 0.80| = 0; the NLL: equal, std 0
    assert len(lines) == 3 and all(line.startswith("- val/accuracy @") for line in lines)
    table = methods.summarise(runs, ["a", "b"], {"val/retention/sub": 1.0, "val/accuracy": 0.3})
    assert "| start checkpoint | 0.300 | 0.300 | 0.300 | 1.000 |" in table
    assert "| a | 0.520 ± 0.020 | 0.520 ± 0.020 | 0.520 ± 0.020 | 0.800 ± 0.100 | 0.200 ± 0.100 |" in table


def test_amft_cost_quick_times_meta_and_ordinary_updates():
    proc = subprocess.run(
        [sys.executable, "benchmarks/amft_cost.py", "--quick"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert out["meta_updates"] == 2 and out["rl_updates"] == 4
    assert out["rl_update_s"] > 0 and out["meta_update_s"] > 0 and out["extra_tensors_mib"] > 0


def test_memory_scale_quick_measures_one_update_per_process(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'lit-align[bench]')")
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/memory_scale.py",
            "--quick",
            "--vocab",
            "2048",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "memory_scale.json").read_text())
    assert out["command"].startswith("python benchmarks/memory_scale.py --quick") and out["date"]
    assert out["model"]["vocab"] == 2048 and out["model"]["architecture"] == "Qwen2ForCausalLM"
    runs = out["runs"]
    assert [(r["side"], r["prompts"], r["max_new_tokens"]) for r in runs] == [
        ("grpo", 2, 8),
        ("chord", 2, 8),
        ("trl", 2, 8),
    ]
    for r in runs:
        assert r["status"] == "ok", r
        assert (
            0
            < r["baseline_peak_gib"]
            <= r["peak_at_train_start_gib"]
            <= r["peak_after_generation_gib"]
            <= r["peak_gib"]
        )
        assert r["update_gib"] == pytest.approx(r["peak_gib"] - r["baseline_peak_gib"])
        assert r["max_vmrss_seen_gib"] <= r["peak_gib"] * 1.01
        assert r["steps_done"] == 1 and r["completions"] == r["prompts"] * r["G"]
        assert r["mean_completion_length"] == r["max_new_tokens"] == 8  # forced to full length
        assert r["forwards"]["train"]["forwards"] >= 1 and r["forwards"]["nograd"]["max_rows"] >= 1
    for r in runs:  # TRL: one micro-batch of 4 rows per forward/backward, gradient accumulation for the rest
        if r["side"] == "trl":
            assert r["forwards"]["train"]["max_rows"] == 4
            assert r["trl_gradient_accumulation_steps"] == 2
        assert r["expert_rows"] == (r["prompts"] * r["G"] // 4 if r["side"] == "chord" else 0)
    table = (tmp_path / "memory_scale.md").read_text()
    assert "`python benchmarks/memory_scale.py --quick" in table and "| trl | 2 x 4 | 8 |" in table


def test_memory_scale_validation_decodes_and_scores_in_bounded_batches(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/memory_scale.py",
            "--quick",
            "--vocab",
            "2048",
            "--validation",
            "--val-rows",
            "10",
            "--val-tokens",
            "8",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "memory_scale_validation.json").read_text())
    assert r["status"] == "ok" and r["val_rows"] == 10 and r["command"].startswith("python benchmarks/memory_scale.py")
    assert 0 < r["baseline_peak_gib"] <= r["peak_gib"]
    nograd = r["forwards"]["nograd"]  # one validation batch of 10 rows: decoded 4 at a time, scored 4 at a time
    assert nograd["max_rows"] == 4 and r["forwards"]["train"]["forwards"] == 0
    assert {"val/accuracy", "val/expert_nll"} <= set(r["metrics"]) and r["metrics"]["val/expert_nll"] > 0


def test_memory_scale_guard_kills_a_process_above_the_cap(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_scale", ROOT / "benchmarks" / "memory_scale.py")
    memory_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_scale)
    grow = "import time; x = b'1' * (600 << 20); time.sleep(60)"  # 600 MiB, touched
    out = memory_scale.run_guarded([sys.executable, "-c", grow], max_gb=0.25, log_path=tmp_path / "log")
    assert out["killed_at_gib"] > 0.25 and out["returncode"] == -9 and out["wall_s"] < 30
    assert out["peak_gib"] >= out["killed_at_gib"]
    assert memory_scale.covers((4, 128), (8, 128)) and memory_scale.covers((4, 128), (4, 256))
    assert not memory_scale.covers((4, 128), (2, 512))


def test_memory_methods_quick_runs_each_recipe_offline_in_its_own_process(tmp_path):
    """benchmarks/memory_methods.py --quick: configs/math_chord_phi.yaml and configs/math_hpt.yaml each run as
    ``python train.py fit`` on a random 151,936-token Qwen2 chat checkpoint and GSM8K-format rows built by the
    script, with micro_batch_size 2 honoured, and their peaks recorded in order."""
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/memory_methods.py",
            "--quick",
            "--configs",
            "math_chord_phi",
            "math_hpt",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "memory_methods.json").read_text())
    assert out["command"].startswith("python benchmarks/memory_methods.py --quick") and out["date"]
    assert out["model"]["vocab"] == 151936 and out["model"]["architecture"] == "Qwen2ForCausalLM"
    runs = {r["config"]: r for r in out["runs"]}
    assert list(runs) == ["math_chord_phi", "math_hpt"]
    for r in runs.values():
        assert r["status"] == "ok", r
        assert (
            0 < r["baseline_peak_gib"] <= r["peak_at_train_start_gib"] <= r["peak_after_step_gib"][0] <= r["peak_gib"]
        )
        assert r["update_gib"] == pytest.approx(r["peak_gib"] - r["baseline_peak_gib"])
        assert r["steps_done"] == 2 and r["logged_steps"] == 2 and len(r["peak_after_step_gib"]) == 2
        assert r["micro_batch_size"] == 2 and 1 <= r["forwards"]["train"]["max_rows"] <= 2
        assert r["num_generations"] == 4 and r["logged_means"]["train/completion_length"] == 8.0
    assert runs["math_chord_phi"]["module"] == "CHORDModule" and runs["math_chord_phi"]["logged_means"][
        "train/mu"
    ] == pytest.approx(0.1)
    # a random checkpoint answers nothing right: HPT routes every prompt to SFT on its worked solution
    assert runs["math_hpt"]["module"] == "HPTModule" and runs["math_hpt"]["logged_means"]["train/gate_sft_share"] == 1.0
    table = (tmp_path / "memory_methods.md").read_text()
    assert "`python benchmarks/memory_methods.py --quick" in table and "| math_hpt | HPTModule | 8.0 |" in table


def test_base_sampling_quick_measures_pass_at_k_entropy_and_retention():
    """benchmarks/base_sampling.py (issue 25) on the embedded checkpoints: a freshly initialised model samples
    near-uniform tokens (entropy close to ln 16 nats, the tokenizer's size) and answers nothing; the pre-trained
    base (a few updates in the tests) samples with less entropy; pass@8 is never below pass@1."""
    import math

    fresh = json.loads(
        (out := _run_text("benchmarks/base_sampling.py", "--quick", "--model", "embedded"))[out.index("{") :]
    )
    base = _run_text("benchmarks/base_sampling.py", "--quick", "--model", "embedded-base")
    base = json.loads(base[base.index("{") :])
    for run in (fresh, base):
        assert run["n"] == 8 and run["problems"] == 24 and 0 < run["carry_problems"] < 24
        assert 0 <= run["pass@1"] <= run["pass@8"] <= 1 and 0 <= run["frac_reward_zero_std"] <= 1
        assert set(run["greedy"]) == {"accuracy", "retention/subtraction", "retention/reversal"}
        assert run["sampled_tokens"] >= 24 * 8 and run["command"].startswith("python benchmarks/base_sampling.py")
    assert math.log(16) - 0.3 < fresh["entropy"] <= math.log(16) and fresh["pass@8"] == 0
    assert fresh["recipe"] is None and base["recipe"]["steps"] == int(os.environ["LIT_ALIGN_BASE_STEPS"])
    assert base["entropy"] < fresh["entropy"]  # pre-training sharpens the answers


def _run_text(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
