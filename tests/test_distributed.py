"""Two CPU processes (gloo): DDP and the sharded strategy (``fsdp2``).

- numerical equivalence: one update on 2 ranks with unequal token counts, in micro-batches of one
  row, equals one process on the same global batch in one forward, for the SFT term, the GRPO term
  with rollouts held fixed (also with GSPO's sequence ratio and an entropy bonus, and with Dr.GRPO's
  constant normaliser), LUFFY's and SRFT's mixed groups (SRFT's entropy H over all ranks),
  Prefix-RFT's (its top-entropy prefix tokens chosen over both ranks), HPT (rank 0's prompt routed to
  SFT, rank 1's to GRPO: each rank holds rows of one term only) and AMFT's meta step (guards the gloo
  AVG bug and the global normalisation);
- generation under FSDP2 does not deadlock when ranks stop at different lengths, nor when one rank's
  rows continue prefixes and the other's do not;
- AMFT's meta step on 2 ranks: one controller everywhere; under FSDP2 the same mu as one process;
- end to end through ``train.py``: CHORD, AMFT, LUFFY, SRFT, HPT and Prefix-RFT under ``ddp`` and
  ``fsdp2`` (with export and a resume where the method has one), ``fsdp`` fails naming ``fsdp2``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from lit_align.controller import ScalarMu
from lit_align.events import read_scalars
from lit_align.modules.amft import AMFTModule
from lit_align.modules.grpo import GRPOModule
from lit_align.modules.hpt import HPTModule
from lit_align.modules.luffy import LUFFYModule
from lit_align.modules.prefix_rft import PrefixRFTModule
from lit_align.modules.sft import SFTModule
from lit_align.modules.srft import SRFTModule
from lit_align.rollout import Rollout

ROOT = Path(__file__).resolve().parents[1]
LR = 0.5  # SGD: the update is proportional to the gradient, so a summed (2x) gradient shows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixed batches
class FixedRolloutGRPO(GRPOModule):
    """GRPO whose rollouts and rewards come with the batch: the update is a pure function of it."""

    def rollout_and_score(self, batch):
        r = batch["rollout"]
        rollout = Rollout(
            r["prompt_ids"],
            r["prompt_mask"],
            r["completion_ids"],
            r["completion_mask"],
            r["old_logp"],
            torch.zeros_like(r["old_logp"]),
            [""] * len(r["prompt_ids"]),
        )
        return rollout, batch["rewards"], {}


class _FixedGroups:
    """A mixed-group method whose groups come with the batch: each prompt's rows are a sample, then its
    demonstration (G = 2, k = 1; behaviour log-prob 0), with the samples' sampling-time entropy (SRFT's H)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.demonstrations_per_prompt = 0  # the groups come with the batch: no data module pairs them

    def rollout_and_score(self, batch):
        rollout, rewards, metrics = FixedRolloutGRPO.rollout_and_score(self, batch)
        n = len(rewards)
        rollout.group_ids = torch.arange(n) // 2
        rollout.off_policy = torch.arange(n) % 2 == 1
        rollout.old_logp = rollout.old_logp.masked_fill(rollout.off_policy.unsqueeze(-1), 0.0)
        rollout.entropy = batch["rollout"]["entropy"]
        return rollout, rewards, metrics


class FixedGroupsLUFFY(_FixedGroups, LUFFYModule):
    pass


class FixedGroupsSRFT(_FixedGroups, SRFTModule):
    pass


class FixedRolloutPrefixRFT(PrefixRFTModule):
    """Prefix-RFT on the batch's fixed rollouts: rows 1 and 3 (one per prompt, one per rank) continue
    prefixes of 3 and 2 tokens whose sampling-time entropies are given with the batch (no demonstration
    is read: the batch holds none)."""

    demonstrations_per_prompt = 0

    def rollout_and_score(self, batch):
        rollout, rewards, metrics = FixedRolloutGRPO.rollout_and_score(self, batch)
        r = batch["rollout"]
        rollout.entropy, rollout.prefix_mask = r["prefix_entropy"], r["prefix_mask"]
        rollout.group_ids = torch.arange(len(rewards), device=rewards.device) // 2
        rollout.off_policy = r["prefix_mask"].bool().any(-1)
        return rollout, rewards, metrics


class FixedRolloutAMFT(AMFTModule):
    """AMFT with the batch's fixed rollouts and a held-out expert-NLL objective: one meta step is a
    pure function of the batch, so 2 ranks can be compared with 1 process."""

    rollout_and_score = FixedRolloutGRPO.rollout_and_score


class FixedRolloutHPT(HPTModule):
    """HPT with the batch's fixed rollouts: the gate and the update are a pure function of the batch."""

    rollout_and_score = FixedRolloutGRPO.rollout_and_score
    demonstrations_per_prompt = 0  # the batches carry their demonstrations: no data module to pair them


def _batches(ckpt: str) -> dict:
    """Global batches: 4 expert rows, and 2 prompts x G=2 rollouts, rank 1's rows (2-3) holding fewer
    tokens than rank 0's: the loss is normalised over the global batch, so unequal counts per rank must
    still give one process's update."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 16, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2:, :8] = -100  # rank 1: 2 expert tokens per row, rank 0: 6
    expert = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    prompt_ids = torch.randint(3, 16, (4, 5), generator=g)
    prompt_ids[2:] = prompt_ids[2:3]  # rows 0-1: prompt 0, rows 2-3: prompt 1
    prompt_ids[:2] = prompt_ids[0:1]
    completion_ids = torch.randint(3, 16, (4, 6), generator=g)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        full = torch.cat([prompt_ids, completion_ids], 1)
        logits = model(full).logits[:, 4:-1]
        old_logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[2, 2:] = 0  # rank 1's completions are shorter: 3 and 6 tokens against 6 and 6
    # Prefix-RFT: rows 1 and 3 continue prefixes of 3 and 2 tokens; of the 5 given tokens (entropies 0.1,
    # 0.9, 0.3 on rank 0; 0.8, 0.2 on rank 1) the top 40% over both ranks keep a gradient (0.9 and 0.8),
    # where each rank on its own would keep 0.9 and 0.3 (rank 0), 0.8 (rank 1)
    prefix_mask = torch.zeros_like(completion_ids)
    prefix_mask[1, :3] = prefix_mask[3, :2] = 1
    entropy = torch.rand(completion_ids.shape, generator=g)
    entropy[1, :3] = torch.tensor([0.1, 0.9, 0.3])
    entropy[3, :2] = torch.tensor([0.8, 0.2])
    rollout = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "old_logp": (old_logp - 0.05) * completion_mask,
        # sampling-time entropy, higher on rank 0's rows: a per-rank mean H would differ from the global one
        "entropy": torch.tensor([[2.0], [0.0], [0.5], [0.0]]) * completion_mask,
        "prefix_mask": prefix_mask,
        "prefix_entropy": entropy,  # Prefix-RFT's sampling-time entropy of the given tokens
    }
    meta_ids = torch.randint(3, 16, (4, 10), generator=g)
    meta_labels = meta_ids.clone()
    meta_labels[:, :3] = -100
    meta_labels[3, :6] = -100
    meta = {"input_ids": meta_ids, "attention_mask": torch.ones_like(meta_ids), "labels": meta_labels}
    demo_ids = torch.randint(3, 16, (2, 1, 6), generator=g)
    demo_mask = torch.tensor([[[1, 1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0, 0]]])
    prompts = {  # per prompt (HPT): its text, answer and demonstration
        "prompt_ids": prompt_ids[::2],
        "prompt_mask": torch.ones_like(prompt_ids[::2]),
        "demo_ids": demo_ids * demo_mask,
        "demo_mask": demo_mask,
        "demonstrations": [["d0"], ["d1"]],
        "prompts": ["p0", "p1"],
        "answers": ["a0", "a1"],
    }
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9])
    return {"expert": expert, "rollout": rollout, "rewards": rewards, "meta": meta, "prompt_rows": prompts}


def _slice(batches: dict, method: str, rank: int, world: int) -> dict:
    take = lambda t: t.chunk(world)[rank] if world > 1 else t  # noqa: E731  (whole prompt groups per rank)
    expert = {"expert": {k: take(v) for k, v in batches["expert"].items()}}
    prompts = {
        "prompts": {"rollout": {k: take(v) for k, v in batches["rollout"].items()}, "rewards": take(batches["rewards"])}
    }
    if method == "sft":
        return expert
    if method.removesuffix("_batch_std") in ("grpo", "grpo_gspo", "grpo_dr", "luffy", "srft", "prefix_rft"):
        return prompts
    if method == "hpt":
        part = lambda v: v[rank::world] if world > 1 else v  # noqa: E731  (one prompt per rank)
        prompts["prompts"].update({k: part(v) for k, v in batches["prompt_rows"].items()})
        return prompts
    return {**expert, **prompts, "meta": {"expert": {k: take(v) for k, v in batches["meta"].items()}}}


AMFT_ONE_META_STEP = dict(  # every update a meta step, from the first: mu moves by controller_lr * dV/dmu
    num_generations=2,
    warmup_sft_steps=0,
    meta_interval=1,
    meta_objective="expert_nll",
    controller_lr=0.5,
)


# AMFT whose look-ahead is AdamW's own step: two updates on the batch, the second a meta step (so
# the optimizer has moments), each rank's moments being shards of the whole model's under FSDP2
AMFT_ADAM_META_STEP = dict(AMFT_ONE_META_STEP, meta_interval=2, lookahead="optimizer", controller_lr=0.2)
# GRPO on two objectives of the RL-objective settings: GSPO's sequence ratio (a per-row mean over tokens,
# two rows per rank, one per micro-batch) and Dr.GRPO's constant normaliser (rows x loss_scale_factor)
GSPO = {"num_generations": 2, "importance_sampling_level": "sequence", "entropy_coef": 0.05}
DR_GRPO = {"num_generations": 2, "loss_aggregation": "seq-mean-token-sum-norm", "loss_scale_factor": 4.0}
# advantage_norm batch-std: the std of the GLOBAL batch's rewards (LUFFY: of its on-policy rows, one per rank)
BATCH_STD = {"advantage_norm": "batch-std"}
METHODS = (
    "sft",
    "grpo",
    "grpo_gspo",
    "grpo_dr",
    "luffy",
    "srft",
    "prefix_rft",
    "amft",
    "amft_adam",
    "grpo_batch_std",
    "luffy_batch_std",
)
# HPT at gate 1 counting rewards > 0: rank 0's prompt (rewards 1.0, 0.0) trains its demonstration with SFT,
# rank 1's (0.2, 0.9) its samples with GRPO, so each rank holds rows of one term only
HPT = {"num_generations": 2, "gate": 1, "correct_by": "reward", "sft_loss_coef": 0.7}
PREFIX_RFT = {"num_generations": 2, "prefix_rollouts": 1, "entropy_share": 0.4}


def _one_step(ckpt: str, method: str, batch: dict, strategy, devices: int):
    cls, extra, steps = {
        "sft": (SFTModule, {}, 1),
        "grpo": (FixedRolloutGRPO, {"num_generations": 2}, 1),
        "grpo_gspo": (FixedRolloutGRPO, GSPO, 1),
        "grpo_dr": (FixedRolloutGRPO, DR_GRPO, 1),
        "luffy": (FixedGroupsLUFFY, {"num_generations": 2, "demonstrations_per_prompt": 1}, 1),
        "srft": (FixedGroupsSRFT, {"num_generations": 2, "demonstrations_per_prompt": 1}, 1),
        "prefix_rft": (FixedRolloutPrefixRFT, PREFIX_RFT, 1),
        "amft": (FixedRolloutAMFT, {**AMFT_ONE_META_STEP, "controller": ScalarMu(init_mu=0.5)}, 1),
        "amft_adam": (FixedRolloutAMFT, {**AMFT_ADAM_META_STEP, "controller": ScalarMu(init_mu=0.5)}, 2),
        "hpt": (FixedRolloutHPT, HPT, 1),
        "grpo_batch_std": (FixedRolloutGRPO, {"num_generations": 2, **BATCH_STD}, 1),
        "luffy_batch_std": (
            FixedGroupsLUFFY,
            {"num_generations": 2, "demonstrations_per_prompt": 1, "advantage_stats": "on_policy", **BATCH_STD},
            1,
        ),
    }[method]
    if method == "amft_adam":
        optimizer = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)  # noqa: E731
    else:
        optimizer = lambda p: torch.optim.SGD(p, lr=LR)  # noqa: E731
    # two ranks run micro-batches of one row, one process its whole batch at once: same update
    micro = 1 if devices > 1 else None
    module = cls(
        model_name_or_path=ckpt, optimizer=optimizer, gradient_clip=0.0, warmup_steps=0, micro_batch_size=micro, **extra
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return module, trainer


def _worker(rank: int, port: int, ckpt: str, batches: dict, out: str, methods=METHODS) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2"
    )
    import lit_align.strategies  # noqa: F401  registers fsdp2

    results = {}
    for strategy in ("ddp", "fsdp2"):
        for method in methods:
            module, trainer = _one_step(ckpt, method, _slice(batches, method, rank, 2), strategy, 2)
            state = module.full_state_dict()  # collective under fsdp2; every rank gets it under ddp
            if rank == 0 or strategy == "ddp":
                results[f"{strategy}-{method}-rank{rank}"] = state
            if method.startswith("amft"):
                results[f"{strategy}-{method}-mu-rank{rank}"] = float(module.controller.mu.detach())
            if strategy == "fsdp2" and method == "grpo":
                results[f"reduce-rank{rank}"] = module.reduce_metrics(
                    {"x": torch.tensor(float(rank)), "reward_errors": 1.0}
                )
                results[f"reward-metrics-rank{rank}"] = _reward_metrics(module, rank)
                results[f"generate-rank{rank}"] = _uneven_generation(module, rank)
            if method == "prefix_rft":
                results[f"{strategy}-prefix-generate-rank{rank}"] = _prefix_on_one_rank(module, rank)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    if dist.is_initialized():  # torn down before the process exits: gloo's threads then cannot abort it at exit
        dist.barrier()
        dist.destroy_process_group()


# each rank's scores of one reward function, NaN where it does not apply: 2 and 3 rows apply
REWARD_ROWS = ([1.0, float("nan"), 0.0], [0.1, 0.15, float("nan"), 0.2])


def _reward_metrics(module, rank: int) -> dict:
    """``rewards/<name>/mean`` and ``/std`` as logged (each rank's values averaged by reduce_metrics)."""
    from lit_align.rewards import RewardScores

    per_function = torch.tensor(REWARD_ROWS[rank]).unsqueeze(-1).expand(-1, len(module.rewards.names))
    scores = RewardScores(per_function.nan_to_num().sum(-1), per_function.contiguous(), 0)
    return {k: float(v) for k, v in module.reduce_metrics(module.reward_metrics(scores)).items()}


def _uneven_generation(module, rank: int) -> int:
    """Greedy generation where rank 1 stops after one token and rank 0 runs to max_new_tokens:
    without synced_gpus the ranks would wait on each other's all-gathers for ever."""
    assert module.policy.sharded and module.world.synced_generation
    prompts = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long)}
    first = module.sample(prompts, greedy=True, num_generations=1)
    tokens = first.completion_ids[0].tolist()
    unused = next(t for t in range(3, 200) if t not in tokens)
    module.model.generation_config.eos_token_id = tokens[0] if rank == 1 else unused
    again = module.sample(prompts, greedy=True, num_generations=1)
    return int(again.completion_mask.sum())


def _prefix_on_one_rank(module, rank: int) -> list[int]:
    """Sampling where rank 0's first row continues an 8-token prefix and rank 1's rows none (under FSDP2
    every forward is a collective: the given tokens must not make the ranks run different forwards)."""
    prompts = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long)}
    prefix_ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11], [0] * 8])
    prefix_mask = torch.zeros_like(prefix_ids)
    if rank == 0:
        prefix_mask[0] = 1
    torch.manual_seed(rank)
    r = module.sample(prompts, num_generations=2, prefix_ids=prefix_ids, prefix_mask=prefix_mask)
    return r.completion_ids[0, : int(r.completion_mask[0].sum())].tolist()


@pytest.fixture(scope="module")
def two_rank_results(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    batches = _batches(ckpt)
    mp.start_processes(_worker, args=(free_port(), ckpt, batches, str(out)), nprocs=2, start_method="spawn")
    results = {}
    for rank in range(2):
        results.update(torch.load(out / f"rank{rank}.pt", weights_only=False))
    single = {}
    for method in METHODS:
        module = _one_step(ckpt, method, _slice(batches, method, 0, 1), "auto", 1)[0]
        single[method] = module.full_state_dict()
        if method.startswith("amft"):
            single[f"{method}-mu"] = float(module.controller.mu.detach())
    return results, single


def _assert_same_update(dist_state: dict, single_state: dict, start: dict) -> None:
    moved = 0.0
    for k, w0 in start.items():
        d_single = single_state[k] - w0
        d_dist = dist_state[k] - w0
        torch.testing.assert_close(d_dist, d_single, rtol=1e-4, atol=1e-6, msg=k)
        moved += float(d_single.abs().sum())
    assert moved > 1e-3, "the step did not move the weights: the comparison would be vacuous"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
# (not amft_adam's weights: Adam's first step is lr g / (|g| + eps), so where an element's gradient is
# near eps the last-bit differences of a gradient summed in another order show; its test is mu, below)
@pytest.mark.parametrize(
    "method",
    ["sft", "grpo", "grpo_gspo", "grpo_dr", "luffy", "srft", "prefix_rft", "amft", "grpo_batch_std", "luffy_batch_std"],
)
def test_two_ranks_take_the_same_step_as_one_process(two_rank_results, ckpt, method, strategy):
    from safetensors.torch import load_file

    results, single = two_rank_results
    start = load_file(str(Path(ckpt) / "model.safetensors"))
    start.setdefault("lm_head.weight", start["model.embed_tokens.weight"])  # tied
    _assert_same_update(results[f"{strategy}-{method}-rank0"], single[method], start)
    if strategy == "ddp":  # both replicas hold the same weights
        for k, v in results[f"ddp-{method}-rank0"].items():
            assert torch.equal(v, results[f"ddp-{method}-rank1"][k]), k


@pytest.fixture(scope="module")
def two_rank_hpt(ckpt, tmp_path_factory):
    """HPT's one step on 2 ranks (ddp, fsdp2) and in one process, the same global batch."""
    out = tmp_path_factory.mktemp("two_ranks_hpt")
    batches = _batches(ckpt)
    args = (free_port(), ckpt, batches, str(out), ("hpt",))
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    results = {}
    for rank in range(2):
        results.update(torch.load(out / f"rank{rank}.pt", weights_only=False))
    return results, _one_step(ckpt, "hpt", _slice(batches, "hpt", 0, 1), "auto", 1)[0].full_state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_hpt_two_ranks_take_the_same_step_as_one_process(two_rank_hpt, ckpt, strategy):
    """Rank 0 holds only SFT rows, rank 1 only RL rows: each runs the term it lacks on one row at zero
    weight (FSDP2's forwards are collectives), and the step is one process's on the global batch."""
    from safetensors.torch import load_file

    results, single = two_rank_hpt
    start = load_file(str(Path(ckpt) / "model.safetensors"))
    start.setdefault("lm_head.weight", start["model.embed_tokens.weight"])  # tied
    _assert_same_update(results[f"{strategy}-hpt-rank0"], single, start)
    if strategy == "ddp":
        for k, v in results["ddp-hpt-rank0"].items():
            assert torch.equal(v, results["ddp-hpt-rank1"][k]), k


@pytest.mark.parametrize("method", ["amft", "amft_adam"])  # SGD formula; AdamW's own step (sharded moments)
def test_amft_meta_step_on_two_ranks(two_rank_results, method):
    """The controller is identical on every rank, and under DDP and FSDP2 alike the meta-gradient is
    built from the global gradients (reduced over ranks), so mu equals one process's on the global
    batch, with unequal token counts per rank and micro-batches of one row."""
    results, single = two_rank_results
    moved = single[f"{method}-mu"] - 0.5
    assert abs(moved) > 1e-3, "the meta step did not move mu: the comparison would be vacuous"
    # Through AdamW's look-ahead, dtheta'/dg = lr / (sqrt(v) + eps) is large where an element's gradient
    # is tiny, so the last-bit differences of gradients summed in another order (micro-batches of one row,
    # two ranks) move dV/dmu by up to about 0.5%; a missing rank or a per-rank normalisation is tens of %.
    rel = 2e-2 if method == "amft_adam" else 1e-5
    for strategy in ("ddp", "fsdp2"):
        assert results[f"{strategy}-{method}-mu-rank0"] == results[f"{strategy}-{method}-mu-rank1"], strategy
        assert results[f"{strategy}-{method}-mu-rank0"] - 0.5 == pytest.approx(moved, rel=rel, abs=1e-7), strategy


def test_metrics_are_reduced_over_ranks(two_rank_results):
    results, _ = two_rank_results
    for rank in range(2):
        reduced = results[f"reduce-rank{rank}"]
        assert float(reduced["x"]) == 0.5  # a mean over ranks 0 and 1
        assert float(reduced["reward_errors"]) == 2.0  # counts are summed


def _pool_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lit_align.core.engine import Ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks(2)
    logged = {"judge_ms": [10.0, 20.0]} if rank == 0 else {"judge_ms": [60.0], "only_on_rank_1": [3.0]}
    results = {"pooled": ranks.pooled_means(logged), "none": ranks.pooled_means({})}
    dist.destroy_process_group()
    torch.save(results, Path(out) / f"pool{rank}.pt")


def test_log_metric_values_are_pooled_over_ranks(tmp_path):
    """The values reward functions give log_metric: a mean over every rank's values (TRL's sum / count), the same
    on each rank; a name only one rank logged reaches both (the next all-reduce would otherwise pair other names)."""
    mp.start_processes(_pool_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        results = torch.load(tmp_path / f"pool{rank}.pt", weights_only=False)
        assert results["pooled"] == {"judge_ms": (30.0, 3), "only_on_rank_1": (3.0, 1)}
        assert results["none"] == {}


def test_reward_function_mean_and_std_are_the_global_batchs(two_rank_results):
    """TRL's rewards/<name>/mean and /std over the rows a function applies to on all ranks, not the mean
    of each rank's statistics (rank 0: 2 rows apply, rank 1: 3)."""
    results, _ = two_rank_results
    applied = torch.tensor([v for rows in REWARD_ROWS for v in rows])
    applied = applied[~applied.isnan()]
    for rank in range(2):
        metrics = results[f"reward-metrics-rank{rank}"]
        assert metrics and all(k.startswith("rewards/") for k in metrics)
        for name, value in metrics.items():
            want = applied.mean() if name.endswith("/mean") else applied.std()
            assert value == pytest.approx(float(want), rel=1e-6), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_prefixes_on_one_rank_only_sample_everywhere(two_rank_results, strategy):
    results, _ = two_rank_results
    assert results[f"{strategy}-prefix-generate-rank0"][:8] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert results[f"{strategy}-prefix-generate-rank1"][:8] != [4, 5, 6, 7, 8, 9, 10, 11]


def test_sharded_generation_survives_ranks_stopping_at_different_lengths(two_rank_results):
    results, _ = two_rank_results
    assert results["generate-rank1"] == 1
    assert results["generate-rank0"] > 1


# ----------------------------------------------------------------------------- end to end
class RankReport(L.Callback):
    """Test helper (added with --trainer.callbacks+=test_distributed.RankReport): each rank writes
    what it saw and holds at the end of fit to ``<out>/rank<r>.json``."""

    def __init__(self, out: str):
        self.out, self.prompts, self.rollouts = out, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "prompts" in batch:
            self.prompts += batch["prompts"]["prompts"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_samples:
            self.rollouts.append(len(pl_module.last_samples["completions"]))

    def on_fit_end(self, trainer, pl_module):
        from torch.distributed.fsdp import FSDPModule

        params = list(pl_module.model.parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        ref = pl_module.ref_model
        report = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "step": trainer.global_step,
            "prompts": self.prompts,
            "rollouts": self.rollouts,
            "param_sum": sum(float(t.detach().double().sum()) for t in local),
            "local_numel": sum(t.numel() for t in local),
            "numel": sum(p.numel() for p in params),
            "sharded": isinstance(pl_module.model, FSDPModule),
            "ref": None if ref is None else {"training": ref.training, "sharded": isinstance(ref, FSDPModule)},
        }
        if hasattr(pl_module, "controller"):
            report["controller"] = {k: v.tolist() for k, v in pl_module.controller.state_dict().items()}
            report["target_entropy"] = float(pl_module.target_entropy)
            report["mu"] = pl_module.controller_mu(pl_module._stats)
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


TINY = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--data.init_args.expert_batch_size=4",
    "--data.init_args.prompt_batch_size=2",
    "--data.init_args.val_batch_size=4",
    "--model.init_args.num_generations=2",
    "--model.init_args.max_new_tokens=4",
    "--model.init_args.reward=_rewards.LengthMatchReward",
]


def train(config: str, strategy: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py fit`` on 2 CPU processes (Lightning launches rank 1 itself). ``strategy``
    is a --trainer.strategy value or a trainer preset file (configs/trainer_*.yaml)."""
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    chosen = ["--config", strategy] if strategy.endswith(".yaml") else [f"--trainer.strategy={strategy}"]
    args = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        f"configs/{config}.yaml",
        *chosen,
        *TINY,
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=test_distributed.RankReport",
        f"--trainer.callbacks.out={tmp_path}",
        *extra,
    ]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return proc, tmp_path


def _reports(path: Path) -> list[dict]:
    return [json.loads((path / f"rank{r}.json").read_text()) for r in range(2)]


def _check_run(proc, path: Path, rl_steps: int = 3, steps: int = 3) -> tuple[list[dict], Path]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = _reports(path)
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [steps, steps]
    for r in reports:  # rollouts are sampled on each rank, from that rank's own prompts
        assert r["rollouts"] == [2 * 2] * rl_steps  # 2 prompts x G=2 per rank and step
    assert not set(reports[0]["prompts"]) & set(reports[1]["prompts"]), "ranks must see different prompts"
    log_dir = next(path.rglob("hf_model")).parent
    scalars = read_scalars(log_dir)
    assert {"train/mu", "train/loss", "train/reward_mean", "val/accuracy"} <= set(scalars)
    return reports, log_dir


def _check_export(log_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(log_dir / "hf_model")
    model = AutoModelForCausalLM.from_pretrained(log_dir / "hf_model")
    enc = tok(["12+3="], return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] > 5


# rollouts from the first step (no SFT warm-up), and a KL term to a frozen reference model
CHORD_RL = ["--model.init_args.sft_warmup_steps=0", "--model.init_args.beta=0.05"]


def test_chord_under_ddp(tmp_path):
    proc, path = train("chord_phi", "configs/trainer_ddp.yaml", tmp_path, *CHORD_RL)
    reports, log_dir = _check_run(proc, path)
    assert reports[0]["param_sum"] == reports[1]["param_sum"], "DDP replicas drifted apart"
    assert not reports[0]["sharded"] and reports[0]["ref"] == {"training": False, "sharded": False}
    assert "train/kl" in read_scalars(log_dir)


def test_chord_under_fsdp2_shards_generates_exports_and_resumes(tmp_path, ckpt):
    from safetensors.torch import load_file

    from lit_align.export import export_checkpoint

    proc, path = train("chord_phi", "configs/trainer_fsdp.yaml", tmp_path / "a", *CHORD_RL)
    reports, log_dir = _check_run(proc, path)
    for r in reports:
        assert r["sharded"] and r["local_numel"] <= 0.55 * r["numel"], "each rank holds about half the weights"
        assert r["ref"] == {"training": False, "sharded": True}, "the frozen reference is sharded and in eval mode"
    _check_export(log_dir)
    names = set(load_file(str(log_dir / "hf_model" / "model.safetensors")))
    assert names == set(load_file(str(Path(ckpt) / "model.safetensors"))), "same names, tied weights once"
    # the consolidated checkpoint (step 3, the first validation) exports to the same weights
    last = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    exported = export_checkpoint(last, tmp_path / "from_ckpt")
    _same_weights(exported, log_dir / "hf_model")

    # resume it under FSDP2 with activation checkpointing, writing a sharded (per-rank) checkpoint
    proc, path = train(
        "chord_phi",
        "lit_align.strategies.FSDP2Strategy",
        tmp_path / "b",
        *CHORD_RL,
        "--trainer.strategy.activation_checkpointing=true",
        "--trainer.strategy.save_distributed_checkpoint=true",
        f"--ckpt_path={last}",
        "--trainer.max_steps=4",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.filename=periodic-{step}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in _reports(path)] == [4, 4]
    sharded = next(path.rglob("periodic-step=4.ckpt"))
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    log_dir = next(path.rglob("hf_model")).parent
    _same_weights(export_checkpoint(sharded, tmp_path / "from_sharded"), log_dir / "hf_model")


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)


def test_amft_under_ddp_keeps_one_controller(tmp_path):
    if not (ROOT / "configs" / "amft.yaml").exists():
        pytest.skip("AMFT not merged yet")
    proc, path = train(
        "amft",
        "ddp",
        tmp_path,
        "--model.init_args.warmup_sft_steps=1",
        "--model.init_args.meta_interval=1",
        "--data.init_args.meta_batch_size=2",
    )
    reports, log_dir = _check_run(proc, path, rl_steps=2)  # step 1 is the SFT warm-up
    assert reports[0]["param_sum"] == reports[1]["param_sum"]
    assert reports[0]["controller"] == reports[1]["controller"], "the AMFT controller must be identical on all ranks"
    assert reports[0]["target_entropy"] == reports[1]["target_entropy"] and reports[0]["mu"] == reports[1]["mu"]
    assert "train/meta_grad" in read_scalars(log_dir)


def test_amft_under_fsdp2_shards_meta_steps_and_resumes_exactly(tmp_path):
    """AMFT's look-ahead on sharded parameters: meta steps from the second update on (with the entropy
    regulariser, so the RL term's graph is back-propagated twice), one controller on both ranks, the
    export; then a resume from the step-3 checkpoint ends where the uninterrupted run did."""
    amft = [
        "--model.init_args.warmup_sft_steps=1",
        "--model.init_args.meta_interval=1",
        "--data.init_args.meta_batch_size=2",
        "--model.init_args.entropy_coef=0.1",
        "--model.init_args.meta_objective=expert_nll",  # the tiny runs' rewards are often all equal
        "--trainer.max_steps=4",
    ]  # validation and last.ckpt at step 3
    proc, path = train("amft", "configs/trainer_fsdp.yaml", tmp_path / "a", *amft)
    reports, log_dir = _check_run(proc, path, rl_steps=3, steps=4)  # step 1 is the SFT warm-up
    for r in reports:
        assert r["sharded"] and r["local_numel"] <= 0.55 * r["numel"]
    assert reports[0]["controller"] == reports[1]["controller"], "the AMFT controller must be identical on all ranks"
    assert reports[0]["mu"] == reports[1]["mu"] and reports[0]["target_entropy"] == reports[1]["target_entropy"]
    scalars = read_scalars(log_dir)
    meta = [v for _, v in scalars["train/meta_grad"]]
    assert meta and all(v == v for v in meta) and any(v != 0.0 for v in meta), meta
    mu = [v for _, v in scalars["train/mu"]]
    assert mu[0] == 1.0 and mu[-1] != mu[1], f"the meta steps did not move mu: {mu}"
    _check_export(log_dir)

    last = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    proc, path = train("amft", "configs/trainer_fsdp.yaml", tmp_path / "b", *amft, f"--ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _reports(path)
    assert [r["step"] for r in resumed] == [4, 4]
    for r, full in zip(resumed, reports):  # each rank's shard, the controller and H*
        assert r["param_sum"] == pytest.approx(full["param_sum"], rel=1e-6)
        assert r["controller"]["mu"] == pytest.approx(full["controller"]["mu"], rel=1e-6)
        assert r["target_entropy"] == full["target_entropy"], "H* comes back from the checkpoint"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("config", ["luffy", "srft"])
def test_mixed_group_methods_under_ddp_and_fsdp2(config, strategy, tmp_path):
    """configs/<method>.yaml on 2 processes: each rank samples G - 1 = 1 completion per
    prompt and mixes in each prompt's demonstration; the replicas stay equal (DDP) or sharded (FSDP2)."""
    preset = "configs/trainer_ddp.yaml" if strategy == "ddp" else "configs/trainer_fsdp.yaml"
    proc, path = train(config, preset, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = _reports(path)
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [3, 3]
    for r in reports:  # 2 prompts x (1 sample + 1 demonstration) per rank and step
        assert r["rollouts"] == [2 * 2] * 3
    assert not set(reports[0]["prompts"]) & set(reports[1]["prompts"]), "ranks must see different prompts"
    if strategy == "ddp":
        assert reports[0]["param_sum"] == reports[1]["param_sum"], "DDP replicas drifted apart"
    else:
        assert all(r["sharded"] and r["local_numel"] <= 0.55 * r["numel"] for r in reports)
    log_dir = next(path.rglob("hf_model")).parent
    scalars = read_scalars(log_dir)
    want = {"train/loss", "train/off_policy_token_share", "train/off_policy_weight_mean", "train/expert_advantage_mean"}
    if config == "srft":
        want |= {"train/srft_w_sft", "train/srft_w_rl", "train/sft_loss"}
    assert want | {"val/accuracy"} <= set(scalars), sorted(scalars)
    assert all(0 < v < 1 for _, v in scalars["train/off_policy_token_share"])


# HPT end to end: 2 prompts x G 2 per rank, a length-match verdict a fresh policy earns sometimes (so some
# prompts train with GRPO, the others their demonstrations), two updates per rollout batch
HPT_RUN = ["--model.init_args.steps_per_generation=2", "--trainer.max_steps=4"]


def _check_hpt_run(proc, path: Path, steps: int = 4) -> tuple[list[dict], Path]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = _reports(path)
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [steps, steps]
    for r in reports:  # rollouts sampled on each rank from its own prompts (the last batch's, after each update)
        assert r["rollouts"] == [2 * 2] * steps
    assert not set(reports[0]["prompts"]) & set(reports[1]["prompts"]), "ranks must see different prompts"
    log_dir = next(path.rglob("hf_model")).parent
    scalars = read_scalars(log_dir)
    assert {"train/gate_sft_share", "train/loss", "train/reward_mean", "val/accuracy"} <= set(scalars)
    shares = [v for _, v in scalars["train/gate_sft_share"]]
    assert len(shares) == steps and all(0.0 <= v <= 1.0 for v in shares)
    assert shares[0] == shares[1] and shares[2] == shares[3], "the gate holds for its rollout batch"
    return reports, log_dir


def test_hpt_under_ddp(tmp_path):
    proc, path = train("hpt", "ddp", tmp_path, *HPT_RUN)
    reports, _ = _check_hpt_run(proc, path)
    assert reports[0]["param_sum"] == reports[1]["param_sum"], "DDP replicas drifted apart"


def test_hpt_under_fsdp2_shards_and_resumes_exactly(tmp_path):
    """Sharded, the export, then a resume from the step-3 checkpoint (between the two updates of the
    second rollout batch: each rank's buffered rollouts and gate come back) ends where the uninterrupted
    run did, on every rank's shard."""
    proc, path = train("hpt", "configs/trainer_fsdp.yaml", tmp_path / "a", *HPT_RUN)
    reports, log_dir = _check_hpt_run(proc, path)
    for r in reports:
        assert r["sharded"] and r["local_numel"] <= 0.55 * r["numel"]
    _check_export(log_dir)
    last = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    proc, path = train("hpt", "configs/trainer_fsdp.yaml", tmp_path / "b", *HPT_RUN, f"--ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _reports(path)
    # update 4 trains on the checkpoint's rollout batch: nothing sampled after the resume
    assert [r["step"] for r in resumed] == [4, 4] and [r["rollouts"] for r in resumed] == [[], []]
    for r, full in zip(resumed, reports):
        assert r["param_sum"] == pytest.approx(full["param_sum"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "configs/trainer_fsdp.yaml"], ids=["ddp", "fsdp2"])
def test_prefix_rft_under(strategy, tmp_path):
    """configs/prefix_rft.yaml on 2 ranks, micro-batches of one row: each rank's rows continue prefixes of its
    own prompts' demonstrations (the sampler's and the step engine's forwards stay in step under FSDP2), the
    replicas stay identical under DDP, the prefix metrics are logged."""
    proc, path = train(
        "prefix_rft",
        strategy,
        tmp_path,
        "--model.init_args.model_name_or_path=embedded",
        "--model.init_args.micro_batch_size=1",
        "--data.init_args.retention_data=null",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = _reports(path)
    assert [r["step"] for r in reports] == [3, 3] and all(r["rollouts"] == [4] * 3 for r in reports)
    if strategy == "ddp":
        assert reports[0]["param_sum"] == reports[1]["param_sum"], "DDP replicas drifted apart"
    else:
        assert all(r["sharded"] for r in reports)
    scalars = read_scalars(next(path.rglob("hf_model")).parent)
    for name in ("train/prefix_ratio_mean", "train/prefix_token_share", "train/off_policy_token_share"):
        assert name in scalars and all(v > 0 for _, v in scalars[name]), name


def test_fsdp1_flag_fails_at_start_naming_fsdp2(tmp_path):
    from lit_align.cli import main

    with pytest.raises(ValueError, match="--trainer.strategy=fsdp2"):
        main(
            [
                "fit",
                "--config",
                "configs/sft.yaml",
                "--trainer.strategy=fsdp",
                "--trainer.accelerator=cpu",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
