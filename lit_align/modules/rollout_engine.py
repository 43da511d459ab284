"""Which engine samples the rollouts (``model.rollout_engine``): lit-align's own sampler or vLLM.

A mixin of :class:`lit_align.modules.policy.PolicyModule`. With ``vllm``, each rank builds one
colocated :class:`lit_align.vllm_engine.VLLMEngine` at fit start, pushes the policy's full weights into
it before sampling whenever an optimizer step changed them (gathered from FSDP2 shards, LoRA merged),
and keeps it until fit ends. The engine's token ids become the same :class:`Rollout` the HF path
returns: ``old_logp`` and ``entropy`` from the trainer's own forward (so the first update of a rollout
batch has ratio 1 whatever the engine's numerics), the engine's log-probs kept as ``sampler_logp``.
"""

from __future__ import annotations

import torch

from lit_align import losses
from lit_align.modules.engine import forward_groups
from lit_align.rollout import Rollout, is_finite_number, is_integer, sampling_settings

ENGINES = ("hf", "vllm")


class RolloutEngine:
    """The vLLM side of :meth:`PolicyModule.sample`; the HF path stays in :mod:`lit_align.rollout`."""

    _engine = None  # the VLLMEngine while fit runs with model.rollout_engine=vllm
    _engine_stale = True  # the policy's weights changed since the engine last got them

    @staticmethod
    def _validate_engine_args(args: dict) -> dict:
        """(name: (holds, what is allowed)) for the engine's knobs, checked with the module's others."""
        number = is_finite_number

        def optional_int(v, low: int) -> bool:
            return v is None or (is_integer(v) and v >= low)

        if args["rollout_engine"] == "vllm" and not _vllm_importable():
            from lit_align.vllm_engine import INSTALL

            raise ImportError(f"model.rollout_engine=vllm needs vLLM, which is not installed: {INSTALL}")
        return {
            "vllm_gpu_memory_utilization": (
                number(args["vllm_gpu_memory_utilization"]) and 0 < args["vllm_gpu_memory_utilization"] <= 1,
                "in (0, 1]",
            ),
            "vllm_kv_cache_memory_bytes": (
                optional_int(args["vllm_kv_cache_memory_bytes"], 1 << 20),
                "null or an integer >= 1048576 (bytes)",
            ),
            "vllm_max_model_length": (optional_int(args["vllm_max_model_length"], 1), "null or an integer >= 1"),
            "vllm_tensor_parallel_size": (
                args["vllm_tensor_parallel_size"] == 1,
                "1 (one colocated engine per training process)",
            ),
            "vllm_importance_sampling_cap": (
                number(args["vllm_importance_sampling_cap"]) and args["vllm_importance_sampling_cap"] >= 1,
                "a finite number >= 1",
            ),
        }

    # ------------------------------------------------------------------ life cycle
    def start_rollout_engine(self) -> None:
        """Build this rank's engine from the policy's checkpoint (fit start; every rank at once)."""
        hp = self.hparams
        if hp.rollout_engine != "vllm" or self._engine is not None:
            return
        from lit_align.hf import _resolve
        from lit_align.vllm_engine import VLLMEngine

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        reason = VLLMEngine.unsupported(base.config) if _vllm_importable() else None
        if reason:
            self._fallback(reason)
            return
        trainer = self._trainer  # None: a module driven by hand, one process
        rank = (trainer.global_rank, trainer.local_rank) if trainer is not None and trainer.world_size > 1 else None
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self._engine = VLLMEngine(
            _resolve(hp.model_name_or_path),
            dtype=dtype,
            gpu_memory_utilization=hp.vllm_gpu_memory_utilization,
            kv_cache_memory_bytes=hp.vllm_kv_cache_memory_bytes,
            max_model_length=hp.vllm_max_model_length,
            tensor_parallel_size=hp.vllm_tensor_parallel_size,
            enable_sleep_mode=hp.vllm_enable_sleep_mode,
            max_num_seqs=hp.generation_batch_size,
            seed=int(torch.initial_seed() % (2**31)),
            rank=rank,
        )
        try:
            self._engine.probe()
        except Exception as e:  # noqa: BLE001  (whatever the engine cannot run: the HF sampler samples)
            engine, self._engine = self._engine, None
            engine.close()
            self._fallback(f"the vLLM engine cannot run this checkpoint ({type(e).__name__}: {str(e)[:200]})")
            return
        self._engine_stale = True  # a resumed or LoRA-wrapped policy differs from the checkpoint's files
        if hp.vllm_enable_sleep_mode and self._engine.on_cpu:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("model.vllm_enable_sleep_mode: vLLM's CPU engine has no sleep mode; it stays loaded")

    def _fallback(self, reason: str) -> None:
        """Say once, on rank 0, that the HF sampler samples instead of the engine, and why."""
        said = self.__dict__.setdefault("_fallbacks_said", set())
        if reason not in said:
            said.add(reason)
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"model.rollout_engine=vllm: {reason}; sampling with lit-align's HF sampler instead")

    def engine_can_sample(self, prompts: dict) -> bool:
        """True when this rank's engine serves ``prompts``; otherwise the HF sampler does (said once).
        Under FSDP2 every rank takes the same path (the HF sampler's forwards are collectives there)."""
        if self._engine is None:
            return False
        reason = self._engine.cannot_sample(prompts["prompt_mask"], self.hparams.max_new_tokens)
        if self._sharded() and self.ranks.world > 1:
            if self.ranks.maxes([float(reason is not None)])[0] > 0:
                reason = reason or "another rank's prompts do not fit the vLLM engine"
        if reason:
            self._fallback(reason)
        return reason is None

    def stop_rollout_engine(self) -> None:
        """Shut this rank's engine down (fit end), leaving the trainer's process group intact."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def weights_changed(self) -> None:
        """An optimizer step changed the policy: the engine gets the new weights before it samples again."""
        self._engine_stale = True

    def _engine_weights(self):
        """The policy's whole weights under Hugging Face names: FSDP2 shards gathered one tensor at a
        time on every rank (a collective: all ranks sync together), LoRA adapters merged."""
        state = self.model.state_dict()
        if hasattr(self.model, "peft_config"):
            from lit_align.export import merge_lora

            full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in state.items()}
            yield from merge_lora(self.model, full).items()
            return
        for name, tensor in state.items():
            yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def engine_sample(self, prompts: dict, greedy: bool, num_generations: int, sampling: dict) -> Rollout:
        """G completions per prompt from the vLLM engine (see :meth:`PolicyModule.sample`): token ids and
        ``sampler_logp`` from the engine; ``old_logp`` and ``entropy`` (B*G, T) from the trainer's forward at
        the sampling temperature (1 when greedy), in micro-batches of ``micro_batch_size`` rows."""
        engine = self._engine
        if self._engine_stale:
            engine.load_weights(self._engine_weights())
            self._engine_stale = False
        settings = sampling_settings(self.model, self.tokenizer, greedy=greedy, **sampling)
        G = 1 if greedy else num_generations
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the global stream: seed_everything reproduces it
        ids, mask, sampler_logp = engine.generate(prompts["prompt_ids"], prompts["prompt_mask"], settings, G, seed)
        engine.sleep()
        prompt_ids = prompts["prompt_ids"].repeat_interleave(G, dim=0)
        prompt_mask = prompts["prompt_mask"].repeat_interleave(G, dim=0)
        T = 1.0 if greedy else self.hparams.temperature
        old_logp, entropy = self._trainer_logprobs(prompt_ids, prompt_mask, ids, mask, T)
        pad = settings["pad_token_id"]
        texts = self.tokenizer.batch_decode(ids * mask + (1 - mask) * pad, skip_special_tokens=True) if len(ids) else []
        return Rollout(prompt_ids, prompt_mask, ids, mask, old_logp, entropy, texts, "vllm", sampler_logp)

    def _trainer_logprobs(self, prompt_ids, prompt_mask, ids, mask, temperature: float):
        """Log-probs of ``ids`` and entropies (B, T), float32, 0 on padding, from the training forward
        (:meth:`_forward_logits`, the policy in its training mode, dropout off) over the step engine's
        forward passes (micro-batches split by length, :func:`forward_groups`). Under FSDP2 every rank
        runs as many forwards as the rank with the most micro-batches."""
        logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        entropy = torch.zeros_like(logp)
        P = prompt_ids.shape[1]
        batches = forward_groups(mask, self.hparams.micro_batch_size, self._length_buckets()) if ids.shape[1] else []
        rounds = len(batches)
        if self._sharded() and self.ranks.world > 1:
            rounds = int(self.ranks.maxes([float(len(batches))])[0])
        for k in range(rounds):
            stand_in = k >= len(batches)  # a rank with fewer micro-batches joins the others' forwards
            if not batches:  # no rows at all on this rank: a one-token stand-in
                self._forward_logits(prompt_ids.new_zeros(1, 2), prompt_mask.new_ones(1, 2), start=0)
                continue
            rows = batches[0 if stand_in else k].to(ids.device)
            width = max(int(mask[rows].sum(-1).max()), 1)
            completion = ids[rows, :width]
            att = torch.cat([prompt_mask[rows], mask[rows, :width].to(prompt_mask.dtype)], 1)
            logits = self._forward_logits(torch.cat([prompt_ids[rows], completion], 1), att, start=P - 1)
            if stand_in:
                continue
            m = mask[rows, :width].float()
            logp[rows, :width] = losses.token_logprobs(logits, completion, temperature).float() * m
            entropy[rows, :width] = losses.entropy_from_logits(logits, temperature).float() * m
        return logp, entropy

    # ------------------------------------------------------------------ what the losses and logs read
    def sampler_metrics(self, rollout: Rollout) -> dict:
        """``sampler_logp_diff`` and ``sampler_logp_diff_max``: mean and max over completion tokens of
        |sampler log-prob - trainer log-prob| (nats) of a vLLM rollout; {} for the HF sampler."""
        if rollout.sampler_logp is None:
            return {}
        m = rollout.completion_mask.bool()
        diff = (rollout.sampler_logp - rollout.old_logp).abs()[m]
        if diff.numel() == 0:
            return {"sampler_logp_diff": torch.tensor(0.0), "sampler_logp_diff_max": torch.tensor(0.0)}
        return {"sampler_logp_diff": diff.mean(), "sampler_logp_diff_max": diff.max()}

    def importance_weights(self, rollout: Rollout, rows: torch.Tensor, width: int) -> torch.Tensor | None:
        """TRL's truncated importance-sampling weights min(exp(old_logp - sampler_logp), cap) of rows
        ``rows``, (b, width), when ``vllm_importance_sampling_correction`` is on and the rollout came
        from the engine; None otherwise."""
        hp = self.hparams
        if not hp.vllm_importance_sampling_correction or rollout.sampler_logp is None:
            return None
        diff = rollout.old_logp[rows, :width] - rollout.sampler_logp[rows, :width]
        return torch.exp(diff).clamp(max=hp.vllm_importance_sampling_cap)


def _vllm_importable() -> bool:
    """vLLM can be imported (without it, building the engine raises an ImportError with the install line)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # not a bare folder named vllm on sys.path
