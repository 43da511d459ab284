"""TRAPO's trust-region SFT (token_weighting: trapo): each expert token's NLL weighted by sg(min(1, p / alpha)),
alpha 0.1, so its gradient is -grad p / max(p, alpha); by hand, through CHORD's SFT term, and from the config."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_align.events import read_scalars
from lit_align.modules.chord import CHORDModule
from lit_align.weighting import ConstantMu, token_weights

ROOT = Path(__file__).resolve().parents[1]


def test_weights_and_gradient_by_hand():
    p = torch.tensor([[0.02, 0.05, 0.1, 0.5, 0.99]], dtype=torch.float64)
    logp = p.log().requires_grad_(True)
    w = token_weights("trapo", logp)
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64))
    assert not w.requires_grad
    (-(w * logp)).sum().backward()
    # d(-w log p)/dlogp = -w; as a gradient in p: -w / p = -1 / max(p, 0.1)
    torch.testing.assert_close(logp.grad / p, -1.0 / p.clamp(min=0.1))


def test_chord_with_mu_one_and_trapo_weights_is_the_weighted_nll(ckpt):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 7, 9, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    expert = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    module = CHORDModule(
        model_name_or_path=ckpt,
        model_dtype="float64",
        mu_schedule=ConstantMu(1.0),
        token_weighting="trapo",
        num_generations=2,
    )
    loss, metrics = module.accumulate_update({"expert": expert})
    with torch.no_grad():
        logits = module.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = labels[:, 1:] != -100
    w = (logp.exp() / 0.1).clamp(max=1.0)
    assert float(loss) == pytest.approx(float((-(w * logp))[keep].mean()), rel=1e-9)
    assert float(metrics["token_weight_mean"]) == pytest.approx(float(w[keep].mean()), rel=1e-9)
    assert math.isclose(float(metrics["mu"]), 1.0)


def test_the_config_trains(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "fit",
            "--config",
            "configs/trapo_sft.yaml",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--data.init_args.retention_data",
            "null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = {e.parent for e in tmp_path.rglob("events.out.tfevents.*")}
    scalars = read_scalars(run)
    weights = [v for _, v in scalars["train/token_weight_mean"]]
    assert len(weights) == 3 and all(0 < v <= 1 for v in weights), weights
    assert [v for _, v in scalars["train/mu"]] == [1.0, 1.0, 1.0]
