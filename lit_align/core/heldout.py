"""The held-out part: greedy answers on held-out prompts (accuracy, reward), pass@k from sampled answers,
retention sets, the NLL of held-out demonstrations (split by whether the reward accepts them), and the
demonstrations' self-check.

:meth:`HeldOut.step` returns what to log as ``(name, value or metric, options)``; the module logs it (a
part never logs through the module that drives it).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lit_align import losses
from lit_align.core.engine import micro_batches
from lit_align.core.policy import Labelled, Policy
from lit_align.core.sampler import Sampler
from lit_align.core.world import World
from lit_align.rewards import RewardScores, RewardSet
from lit_align.rollout import Rollout, completion_id_lists


def check_logged_name(name: str, key: str, taken) -> None:
    """A reward function's ``log_metric`` name must not be logged as one of lit-align's own metrics (``key`` among
    ``taken``): its values would replace them, or be replaced. Raises ValueError naming it."""
    if key in taken:
        raise ValueError(
            f"a reward function called log_metric({name!r}, ...), but {key} is a metric lit-align logs itself: "
            "give the metric another name"
        )


def pass_at_k(n: int, num_correct, k: int) -> torch.Tensor:
    """The unbiased pass@k estimate per problem from ``n`` samples of which ``num_correct`` are correct:
    1 - C(n - c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    arXiv 2107.03374, eq. 1), computed in the numerically stable product form
    1 - prod_{i = n - c + 1}^{n} (1 - k / i): no binomial coefficient is formed, and it is exactly 1 when
    n - c < k (the factor i = k is 0).

    Args:
        n: samples per problem (>= k).
        num_correct: c, correct samples per problem, an int or an integer tensor (P,) in [0, n].
        k: the k of pass@k, in [1, n].

    Returns:
        float64 tensor of ``num_correct``'s shape (on its device): the probability that at least one of
        k samples drawn without replacement from the n is correct.

    Raises:
        ValueError: k outside [1, n] (pass@k is undefined from fewer than k samples), or a count outside
            [0, n].
    """
    c = torch.as_tensor(num_correct)
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} from n={n} samples per problem: k must be in [1, n]")
    if c.is_floating_point() or bool(((c < 0) | (c > n)).any()):
        raise ValueError(f"pass@{k}: correct counts must be integers in [0, n={n}], got {c.tolist()}")
    factors = 1.0 - k / torch.arange(1, n + 1, dtype=torch.float64)  # (n,): 1 - k / i at index i - 1
    tail = torch.ones(n + 1, dtype=torch.float64)  # tail[j] = prod_{i = j + 1}^{n} factors; tail[n] = 1
    tail[:n] = factors.flip(0).cumprod(0).flip(0)
    return (1.0 - tail[n - c.long().cpu()]).to(c.device)


class HeldOut(torch.nn.Module):
    """Validation and test metrics (an ``nn.Module`` so Lightning moves and syncs its torchmetrics).

    Args:
        policy, sampler, rewards: the parts it evaluates with.
        settings: ``reward_errors`` and ``reward_timeout_s`` (how a failing reward call is handled, as in
            training), ``micro_batch_size`` (rows per forward of the held-out NLL; None: all) and
            ``pass_at_k`` / ``pass_at_k_samples`` (the k of ``<prefix>/pass@k``, None: off; n samples per
            prompt, None: max k), as attributes (the module's hparams, read at each call; the pass@k
            metrics are made for the k set when the part is built).
    """

    def __init__(self, policy: Policy, sampler: Sampler, rewards: RewardSet, settings):
        super().__init__()
        object.__setattr__(self, "parts", (policy, sampler, rewards))  # not submodules: owned by the module
        object.__setattr__(self, "settings", settings)
        self.val_accuracy, self.val_reward = MeanMetric(), MeanMetric()
        self.val_expert_nll, self.val_expert_token_acc = MeanMetric(), MeanMetric()
        # val/expert_nll over the demonstrations the reward's correctness check accepts / rejects
        self.val_expert_nll_split = torch.nn.ModuleDict({"correct": MeanMetric(), "incorrect": MeanMetric()})
        self._demo_verdicts: dict[tuple[str, str, str], bool] = {}  # (prompt, demonstration, answer) -> correct
        # val/pass@k per k (a per-problem mean, synced over ranks like val/accuracy)
        self.val_pass_at_k = torch.nn.ModuleDict({str(k): MeanMetric() for k in self.pass_at_k_values})

    @property
    def pass_at_k_values(self) -> list[int]:
        """The k of ``pass@k`` to log (``settings.pass_at_k``; [] when off)."""
        return list(getattr(self.settings, "pass_at_k", None) or [])

    @property
    def pass_at_k_samples(self) -> int:
        """n, samples per held-out prompt for pass@k: ``settings.pass_at_k_samples``, else the largest k."""
        n = getattr(self.settings, "pass_at_k_samples", None)
        return n if n is not None else max(self.pass_at_k_values, default=1)

    def step(
        self, batch: dict, prefix: str, world: World, device, trainer_state=None, batch_idx: int = 0
    ) -> list[tuple[str, object, dict]]:
        """Greedy answers on held-out prompts (accuracy, reward), pass@k from sampled answers (when
        ``pass_at_k`` is set; ``batch_idx`` seeds their draw, :meth:`sampled_verdicts`) and NLL of held-out
        demonstrations; on a batch of a retention set (``batch["retention"]``, the skill), only
        ``<prefix>/retention/<skill>``. ``trainer_state``: what TRL-style reward functions get
        (:meth:`RewardSet.score`); the values they give ``log_metric`` on held-out prompts are logged as
        ``<prefix>/<name>`` (mean over the batch's calls on all ranks, averaged over the batches), not on
        retention sets. Returns the entries to log."""
        if "retention" in batch:
            _, correct = self.greedy_verdicts(batch, world, trainer_state)
            value = correct.float().mean().to(device)
            return [
                (
                    f"{prefix}/retention/{batch['retention']}",
                    value,
                    dict(batch_size=len(batch["prompts"]), sync_dist=True),
                )
            ]
        scores, correct = self.greedy_verdicts(batch, world, trainer_state)
        self.val_reward.update(scores.total.to(device))
        self.val_accuracy.update(correct.float().to(device))
        out = []
        if "expert" in batch:
            nll, hits, tokens = self.expert_nll_rows(batch["expert"])
            n = tokens.sum()
            self.val_expert_nll.update(nll.sum() / n.clamp(min=1), weight=n)
            self.val_expert_token_acc.update(hits.sum() / n.clamp(min=1), weight=n)
            out.append((f"{prefix}/expert_nll", self.val_expert_nll, dict(batch_size=int(n))))
            out.append((f"{prefix}/expert_token_acc", self.val_expert_token_acc, dict(batch_size=int(n))))
            if "responses" in batch:
                out += self._split_expert_nll(batch, nll, tokens, prefix, device, trainer_state)
        bs = len(batch["prompts"])
        out.append((f"{prefix}/accuracy", self.val_accuracy, dict(prog_bar=True, batch_size=bs)))
        out.append((f"{prefix}/reward", self.val_reward, dict(batch_size=bs)))
        if self.pass_at_k_values:
            n = self.pass_at_k_samples
            _, correct = self.sampled_verdicts(batch, world, n, batch_idx, trainer_state)
            correct = correct.view(bs, n)
            for k in self.pass_at_k_values:
                metric = self.val_pass_at_k[str(k)]
                metric.update(pass_at_k(n, correct.sum(1), k).float().to(device))
                out.append((f"{prefix}/pass@{k}", metric, dict(batch_size=bs)))
        if self.parts[2].may_log:  # every rank takes part: the names are merged over ranks
            ours = {name for name, _, _ in out}
            for name, (mean, count) in world.ranks.pooled_means(scores.logged).items():
                check_logged_name(name, f"{prefix}/{name}", ours)
                out.append((f"{prefix}/{name}", torch.tensor(mean, device=device), dict(batch_size=count)))
        return out

    def greedy_verdicts(self, batch: dict, world: World, trainer_state=None):
        """Greedy answers to the batch's prompts: their reward scores (:class:`RewardScores`) and the
        correctness verdict per prompt (bool, (N,)). TRL-style functions get a conversational row's messages
        (``batch["prompt_messages"]``, see :meth:`RewardSet.score`)."""
        _, sampler, rewards = self.parts
        rollout = sampler.sample(batch, world, greedy=True, num_generations=1)
        messages = batch.get("prompt_messages")
        scores = self.score(batch["prompts"], rollout, batch["answers"], batch.get("columns"), trainer_state, messages)
        # a failing check counts as wrong (reward_errors=zero) or stops (raise); the judge's default
        # verdict is read from scores: no second pass
        correct, _ = rewards.correct(
            batch["prompts"],
            rollout.completions,
            batch["answers"],
            scores,
            on_error=self.settings.reward_errors,
            timeout_s=self.settings.reward_timeout_s,
            trainer_state=trainer_state,
            prompt_messages=messages,
        )
        return scores, correct

    def sampled_verdicts(
        self, batch: dict, world: World, n: int, batch_idx: int = 0, trainer_state=None
    ) -> tuple[Rollout, torch.Tensor]:
        """``n`` completions per prompt sampled in one call with the training sampler's settings (temperature,
        top_p, top_k, min_p, ...), a :class:`Rollout` of B * n rows (prompt i's j-th sample is row i * n + j),
        and their correctness verdicts, bool (B * n,), by the rule of val/accuracy (:meth:`RewardSet.correct`).

        The draw leaves the training random stream as it was (the CPU and this device's generators are
        forked and put back), so a run logs the same train/* values with pass@k on or off and resumes
        exactly. Inside, the generators are seeded from the run's seed (``torch.initial_seed()``), this
        rank and ``batch_idx``: each validation draws the same random numbers for the same problems, so the
        curve moves with the model, not with the draw."""
        _, sampler, rewards = self.parts
        device = batch["prompt_ids"].device
        rank = 0
        if world.ranks.world > 1:
            import torch.distributed as dist

            rank = dist.get_rank()
        seed = (torch.initial_seed() * 1_000_003 + rank * 65_537 + batch_idx) % 2**63
        cuda = []  # the CUDA generator sampling draws from, where the batch is on a GPU
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            if cuda:  # this device's generator only (manual_seed would seed every GPU the process sees)
                torch.cuda.default_generators[cuda[0]].manual_seed(seed)
            rollout = sampler.sample(batch, world, greedy=False, num_generations=n)
        prompts = [p for p in batch["prompts"] for _ in range(n)]
        answers = [a for a in batch["answers"] for _ in range(n)]
        columns = {name: [v for v in values for _ in range(n)] for name, values in (batch.get("columns") or {}).items()}
        messages = batch.get("prompt_messages")
        correct, _ = rewards.correct(
            prompts,
            rollout.completions,
            answers,
            completion_ids=completion_id_lists(rollout),
            columns=columns,
            on_error=self.settings.reward_errors,
            timeout_s=self.settings.reward_timeout_s,
            trainer_state=trainer_state,
            prompt_messages=None if messages is None else [m for m in messages for _ in range(n)],
        )
        return rollout, correct

    def score(
        self,
        prompts: list[str],
        rollout,
        answers: list[str],
        columns: dict | None = None,
        trainer_state=None,
        prompt_messages: list | None = None,
    ) -> RewardScores:
        """Every reward function's scores of ``rollout``'s completions (:meth:`RewardSet.score`, with the
        run's ``reward_errors`` and ``reward_timeout_s``); ``columns``: the data set's other columns, one
        value per completion; ``trainer_state``: what TRL-style functions get as ``trainer_state``;
        ``prompt_messages``: per completion, its prompt's messages for a row of conversational data, else None
        (TRL-style functions then get messages, as TRL passes them)."""
        s, rewards = self.settings, self.parts[2]
        ids = completion_id_lists(rollout)
        return rewards.score(
            prompts,
            rollout.completions,
            answers,
            ids,
            columns,
            s.reward_errors,
            s.reward_timeout_s,
            trainer_state,
            prompt_messages,
        )

    @torch.no_grad()
    def expert_nll_rows(self, expert: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of ``expert``: (summed NLL of its response tokens, greedy hits among them, their count),
        each (B,), from forwards of ``micro_batch_size`` rows with logits at response positions only."""
        policy = self.parts[0]
        rows_of = Labelled.of(expert)
        target_mask = rows_of.target_mask
        out = torch.zeros(3, target_mask.shape[0], dtype=torch.float64, device=target_mask.device)
        for rows in micro_batches(target_mask, self.settings.micro_batch_size):
            s = policy.logprobs(rows_of, rows, consume=True)
            hit = losses.chunked(lambda x, y: (x.argmax(-1) == y).float(), s.logits, s.targets)
            tokens = s.mask
            out[:, rows.to(out.device)] = torch.stack(
                [-(s.logp * tokens).sum(1), (hit * tokens).sum(1), tokens.sum(1)]
            ).double()
            del s
        return out[0], out[1], out[2]

    def _split_expert_nll(self, batch: dict, nll, tokens, prefix: str, device, trainer_state=None) -> list:
        """``<prefix>/expert_nll_correct`` and ``_incorrect``: val/expert_nll over the held-out
        demonstrations the reward's correctness check accepts and over those it rejects. Each
        demonstration is checked once per run, on first sight. Every rank updates both metrics every
        batch (weight 0 when it has no such rows), so the cross-rank sync cannot hang; a class absent from
        the whole validation set reads NaN."""
        rewards = self.parts[2]
        keys = list(zip(batch["prompts"], batch["responses"], batch["answers"]))
        new = [i for i, key in enumerate(keys) if key not in self._demo_verdicts]
        if new:  # a demonstration's verdict never changes: each one is checked once per run
            prompts, demos, answers = (list(column) for column in zip(*(keys[i] for i in new)))
            cols = {k: [v[i] for i in new] for k, v in (batch.get("columns") or {}).items()}
            messages = batch.get("prompt_messages")
            verdicts, _ = rewards.correct(
                prompts,
                demos,
                answers,
                columns=cols,
                on_error=self.settings.reward_errors,
                timeout_s=self.settings.reward_timeout_s,
                trainer_state=trainer_state,
                prompt_messages=None if messages is None else [messages[i] for i in new],
            )
            self._demo_verdicts.update((keys[i], bool(v)) for i, v in zip(new, verdicts.tolist()))
        ok = torch.tensor([self._demo_verdicts[key] for key in keys], device=device)
        out = []
        for name, rows in (("correct", ok), ("incorrect", ~ok)):
            k = tokens[rows].sum()
            value = nll[rows].sum() / k if k > 0 else nll.new_zeros(())
            metric = self.val_expert_nll_split[name]
            metric.update(value, weight=k)
            out.append((f"{prefix}/expert_nll_{name}", metric, dict(batch_size=max(int(k), 1))))
        return out

    def judge_demonstrations(
        self,
        prompts: list[str],
        completions: list[str],
        answers: list[str],
        completion_ids: list[list[int]] | None = None,
        columns: dict | None = None,
        trainer_state=None,
        prompt_messages: list | None = None,
    ) -> torch.Tensor:
        """Bool (N,): which texts the reward set accepts as correct (the data module's set-up self-check;
        ``prompt_messages``: as for :meth:`score`).
        Where a reward function failed on some of them (an exception, the time limit, NaN; scored 0 under
        ``reward_errors=zero``), a warning says so: the cause is then the function, not the data."""
        rewards = self.parts[2]
        verdicts, n_errors = rewards.correct(
            prompts,
            completions,
            answers,
            completion_ids=completion_ids,
            columns=columns,
            on_error=self.settings.reward_errors,
            timeout_s=self.settings.reward_timeout_s,
            trainer_state=trainer_state,
            prompt_messages=prompt_messages,
        )
        if n_errors:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"self-check: the reward failed on {int(n_errors)} of {len(completions)} demonstrations (an exception, "
                f"model.reward_timeout_s={self.settings.reward_timeout_s}, or a non-finite value; model.reward_errors="
                f"{self.settings.reward_errors!r} scores them 0): check the reward functions and the columns they take; "
                f"--model.init_args.reward_errors raise shows the error"
            )
        return verdicts
