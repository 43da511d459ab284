"""val/pass@k: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374) against hand-computed values, the
settings that make it undefined refused at start-up, the held-out wiring (n samples per prompt judged by
val/accuracy's rule), and a fit that logs it without changing what training logs."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.cli import main
from lit_align.core.heldout import pass_at_k
from lit_align.events import read_scalars


def by_comb(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), the estimator's definition (math.comb(m, k) is 0 for m < k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_hand_computed_values():
    # n = 16, c = 3: 1 - C(13, 4) / C(16, 4) = 1 - 715 / 1820
    assert float(pass_at_k(16, 3, 4)) == pytest.approx(1 - 715 / 1820, abs=1e-15)
    # pass@1 is the share of correct samples
    assert float(pass_at_k(10, 3, 1)) == pytest.approx(0.3, abs=1e-15)
    # n = 5, c = 2, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    assert float(pass_at_k(5, 2, 2)) == pytest.approx(0.7, abs=1e-15)


def test_pass_at_k_at_the_edges():
    # c = 0: no sample is right, whatever k; c = n: every draw holds a right one
    for n, k in [(1, 1), (4, 1), (4, 4), (16, 16), (16, 4)]:
        assert float(pass_at_k(n, 0, k)) == 0.0
        assert float(pass_at_k(n, n, k)) == 1.0
    # n = k: pass@k is "any of the n samples is right"
    assert pass_at_k(4, torch.tensor([0, 1, 2, 4]), 4).tolist() == [0.0, 1.0, 1.0, 1.0]
    # n - c < k: every k-subset holds a correct sample, exactly 1 (the product's factor i = k is 0)
    assert float(pass_at_k(5, 3, 3)) == 1.0 and float(pass_at_k(16, 13, 4)) == 1.0


def test_pass_at_k_matches_the_binomial_definition_for_every_count():
    for n in (1, 2, 5, 16, 64):
        c = torch.arange(n + 1)
        for k in sorted({1, 2, 4, 16, n} & set(range(1, n + 1))):
            got = pass_at_k(n, c, k)
            assert got.shape == c.shape and got.dtype == torch.float64
            want = torch.tensor([by_comb(n, int(ci), k) for ci in c], dtype=torch.float64)
            assert torch.allclose(got, want, rtol=0, atol=1e-12), (n, k)
            assert bool((got[1:] >= got[:-1]).all()), "more correct samples never lower pass@k"


def test_pass_at_k_is_undefined_for_k_above_n_and_bad_counts():
    with pytest.raises(ValueError, match=r"pass@5 from n=4 samples per problem: k must be in \[1, n\]"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"k must be in \[1, n\]"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match=r"correct counts must be integers in \[0, n=4\]"):
        pass_at_k(4, torch.tensor([1, 5]), 2)
    with pytest.raises(ValueError, match="correct counts must be integers"):
        pass_at_k(4, torch.tensor([0.5]), 2)


@pytest.mark.parametrize(
    "flags,match",
    [
        (
            ["--model.init_args.pass_at_k=[1,4,16]", "--model.init_args.pass_at_k_samples=8"],
            r"model.pass_at_k=\[1, 4, 16\]: pass@16 is undefined from model.pass_at_k_samples=8 samples per problem",
        ),
        (["--model.init_args.pass_at_k_samples=4"], "model.pass_at_k_samples=4 is set but model.pass_at_k is null"),
        (["--model.init_args.pass_at_k=[0,4]"], r"model.pass_at_k=\[0, 4\] is out of range"),
        (["--model.init_args.pass_at_k=[4,4]"], r"model.pass_at_k=\[4, 4\] is out of range: .*distinct integers"),
        (["--model.init_args.pass_at_k=[]"], r"model.pass_at_k=\[\] is out of range"),
    ],
    ids=["k-above-n", "n-without-k", "k-zero", "k-repeated", "empty"],
)
def test_undefined_pass_at_k_settings_stop_the_run_at_start_up(flags, match, tmp_path):
    """Refused while the module is built, naming the flags: before a checkpoint is loaded or a step is run."""
    with pytest.raises(ValueError, match=match):
        main(["fit", "--config", "configs/sft.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *flags])
    assert not list(tmp_path.rglob("*.ckpt")), "nothing trained"


@pytest.mark.parametrize("flag,expected", [("4", [4]), ("[4]", [4]), ("0", None)])
def test_a_single_k_on_the_command_line_is_a_list_of_one(flag, expected, tmp_path):
    """--model.init_args.pass_at_k=4 means [4] (jsonargparse refused it with its raw type error); 0 is out of
    range and named as such."""
    args = ["--config", "configs/sft.yaml", f"--model.init_args.pass_at_k={flag}"]
    if expected is None:
        with pytest.raises(ValueError, match=r"model.pass_at_k=\[0\] is out of range"):
            main(["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}"])
        return
    cli = main(args, run=False)
    assert cli.model.hparams.pass_at_k == expected and cli.model.heldout.pass_at_k_values == expected


def test_pass_at_k_is_the_estimator_over_n_samples_per_prompt_judged_like_accuracy(tmp_path):
    """validate with pass@{1,2,4} from n = 4 samples: the reward sees each prompt's 4 samples in consecutive rows,
    they are sampled (not 4 copies of the greedy answer), and each logged pass@k is the mean over the problems of
    the estimator of the counts of correct samples (even length: ParityReward's verdict)."""
    n, batches, batch_size = 4, 2, 6
    cli = main(
        [
            "validate",
            "--config",
            "configs/sft.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.limit_val_batches={batches}",
            f"--data.init_args.val_batch_size={batch_size}",
            "--data.init_args.retention_data=null",
            "--model.init_args.reward=_rewards.ParityReward",
            "--model.init_args.pass_at_k=[1,2,4]",
            f"--model.init_args.pass_at_k_samples={n}",
        ]
    )
    sampled = [(p, c) for p, c in cli.model.reward.calls if len(c) == batch_size * n]
    greedy = [(p, c) for p, c in cli.model.reward.calls if len(c) == batch_size]
    assert len(sampled) == batches and len(greedy) >= batches, [len(c) for _, c in cli.model.reward.calls]
    counts, distinct = [], 0
    for prompts, completions in sampled:
        for i in range(batch_size):
            rows = range(i * n, (i + 1) * n)
            assert len({prompts[r] for r in rows}) == 1, "one prompt's n samples are consecutive rows"
            counts.append(sum(len(completions[r]) % 2 == 0 for r in rows))
            distinct += len({completions[r] for r in rows}) > 1
    assert distinct > 0, "the n answers are sampled, not the greedy one n times"
    assert 0 < sum(counts) < n * len(counts), f"a mix of right and wrong samples makes the check bite: {counts}"
    metrics = cli.trainer.callback_metrics
    for k in (1, 2, 4):
        want = sum(by_comb(n, c, k) for c in counts) / len(counts)
        assert float(metrics[f"val/pass@{k}"]) == pytest.approx(want, abs=1e-6), k
    assert float(metrics["val/pass@1"]) == pytest.approx(sum(counts) / (n * len(counts)), abs=1e-6)
    assert "val/accuracy" in metrics


GRPO_TINY = [
    "--config",
    "configs/grpo.yaml",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--model.init_args.num_generations=2",
    "--model.init_args.reward=_rewards.ParityReward",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=4",
    "--data.init_args.retention_data=null",
]


def test_a_fit_logs_pass_at_k_and_the_same_training_values_as_without_it(tmp_path, ckpt, task):
    """GRPO, 4 updates, validation after updates 2 and 4: with pass@{1,4} on, val/pass@1 and val/pass@4 are logged
    at each validation (pass@1 in [0, 1], pass@4 >= pass@1), and every train/* value and val/accuracy equal the run
    without it: sampling at the temperature in validation leaves the training random stream as it was (a draw from
    it would change update 3's rollouts, and ParityReward's rewards with them). The embedded checkpoint and task
    are built before (``ckpt``, ``task``): building them seeds the global RNG, which would tell the first run apart."""

    def fit(name: str, *extra: str) -> dict:
        save = tmp_path / name
        cli = main(["fit", *GRPO_TINY, f"--trainer.logger.init_args.save_dir={save}", *extra])
        assert cli.trainer.global_step == 4
        return read_scalars(cli.trainer.log_dir)

    off = fit("off")
    on = fit("on", "--model.init_args.pass_at_k=[1,4]")
    assert [s for s, _ in on["val/pass@1"]] == [s for s, _ in on["val/accuracy"]] and len(on["val/pass@1"]) == 2
    for (_, p1), (_, p4) in zip(on["val/pass@1"], on["val/pass@4"]):
        assert 0.0 <= p1 <= 1.0 and p1 <= p4 <= 1.0
    assert not any(name.startswith("val/pass@") for name in off)
    train = sorted(name for name in off if name.startswith("train/"))
    assert "train/reward_mean" in train and sorted(name for name in on if name.startswith("train/")) == train
    for name in [*train, "val/accuracy"]:
        assert on[name] == off[name], name


class PassAtKReport(L.Callback):
    """Test helper (``--trainer.callbacks+=test_pass_at_k.PassAtKReport``): each rank writes its own, unsynced sum of
    per-problem pass@k estimates and problem count per k to ``<out>/pass_at_k_rank<r>.json`` when fit ends."""

    def __init__(self, out: str):
        self.out, self.local = out, {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for k, metric in pl_module.heldout.val_pass_at_k.items():
            self.local[k] = [float(metric.mean_value), float(metric.weight)]

    def on_fit_end(self, trainer, pl_module):
        Path(self.out, f"pass_at_k_rank{trainer.global_rank}.json").write_text(json.dumps(self.local))


def test_pass_at_k_is_the_mean_over_the_problems_of_every_rank(tmp_path):
    """FSDP2 on 2 CPU processes (sampling's forwards synced over ranks, each rank its own problems and seed):
    val/pass@k is the mean over both ranks' problems, not rank 0's."""
    from test_distributed import train

    proc, _ = train(
        "sft",
        "fsdp2",
        tmp_path,
        "--model.init_args.reward=_rewards.ParityReward",
        "--model.init_args.pass_at_k=[1,3]",
        "--data.init_args.retention_data=null",
        "--trainer.callbacks+=test_pass_at_k.PassAtKReport",
        f"--trainer.callbacks.out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"pass_at_k_rank{r}.json").read_text()) for r in range(2)]
    scalars = read_scalars(tmp_path)
    for k in ("1", "3"):
        (sum0, n0), (sum1, n1) = ranks[0][k], ranks[1][k]
        assert n0 == n1 == 4, "each rank judged its own batch of 4 problems"
        logged = scalars[f"val/pass@{k}"]
        assert len(logged) == 1 and logged[0][1] == pytest.approx((sum0 + sum1) / (n0 + n1), abs=1e-6), k
    assert ranks[0]["1"][0] != ranks[1]["1"][0], "the ranks' own means differ: the check tells a sync from none"
