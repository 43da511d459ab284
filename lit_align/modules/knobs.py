"""The range check of the policy module's knobs: every out-of-range value is a ValueError that names
its flag (``model.<name>``) and what is allowed, raised before anything is loaded."""

from __future__ import annotations

from lit_align import losses
from lit_align.modules.rollout_engine import ENGINES, RolloutEngine
from lit_align.rollout import is_finite_number, is_integer


def check_knobs(args: dict) -> None:
    """``args``: :class:`lit_align.modules.policy.PolicyModule`'s constructor arguments by name.

    Raises:
        ValueError: naming ``model.<name>``, its value and the allowed range or choices.
    """
    number, integer = is_finite_number, is_integer
    timeout = args["reward_timeout_s"]
    checks = {  # name: (holds, what is allowed)
        "num_generations": (integer(args["num_generations"]) and args["num_generations"] >= 1, "an integer >= 1"),
        "max_new_tokens": (integer(args["max_new_tokens"]) and args["max_new_tokens"] >= 1, "an integer >= 1"),
        "temperature": (number(args["temperature"]) and args["temperature"] > 0, "a finite number > 0"),
        "top_p": (number(args["top_p"]) and 0 < args["top_p"] <= 1, "in (0, 1]"),
        "top_k": (integer(args["top_k"]) and args["top_k"] >= 0, "an integer >= 0 (0: off)"),
        "epsilon_low": (number(args["epsilon_low"]) and 0 <= args["epsilon_low"] < 1, "in [0, 1)"),
        "epsilon_high": (number(args["epsilon_high"]) and args["epsilon_high"] >= 0, "a finite number >= 0"),
        "beta": (number(args["beta"]) and args["beta"] >= 0, "a finite number >= 0"),
        "warmup_steps": (integer(args["warmup_steps"]) and args["warmup_steps"] >= 0, "an integer >= 0"),
        "gradient_clip": (
            number(args["gradient_clip"]) and args["gradient_clip"] >= 0,
            "a finite number >= 0 (0: off)",
        ),
        "min_lr_ratio": (number(args["min_lr_ratio"]) and 0 <= args["min_lr_ratio"] <= 1, "in [0, 1]"),
        "max_consecutive_skips": (
            integer(args["max_consecutive_skips"]) and args["max_consecutive_skips"] >= 1,
            "an integer >= 1",
        ),
        "reward_timeout_s": (timeout is None or (number(timeout) and timeout > 0), "null or a finite number > 0"),
        "length_buckets": (integer(args["length_buckets"]) and args["length_buckets"] >= 1, "an integer >= 1"),
        "micro_batch_size": (
            args["micro_batch_size"] is None or (integer(args["micro_batch_size"]) and args["micro_batch_size"] >= 1),
            "null (the whole batch) or an integer >= 1",
        ),
        "generation_batch_size": (
            args["generation_batch_size"] is None
            or (integer(args["generation_batch_size"]) and args["generation_batch_size"] >= 1),
            "null (every row at once) or an integer >= 1",
        ),
        "steps_per_generation": (
            integer(args["steps_per_generation"]) and args["steps_per_generation"] >= 1,
            "an integer >= 1",
        ),
        "num_iterations": (integer(args["num_iterations"]) and args["num_iterations"] >= 1, "an integer >= 1"),
        "repetition_penalty": (
            number(args["repetition_penalty"]) and args["repetition_penalty"] > 0,
            "a finite number > 0 (1: off)",
        ),
        "min_p": (number(args["min_p"]) and 0 <= args["min_p"] < 1, "in [0, 1) (0: off)"),
        **RolloutEngine._validate_engine_args(args),
    }
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"model.{name}={args[name]!r} is out of range: it must be {allowed}")
    rewards = args["reward"] if isinstance(args["reward"], (list, tuple)) else [args["reward"]]
    for fn in rewards:
        if fn is not None and not callable(fn):
            raise ValueError(
                f"model.reward={args['reward']!r}: {fn!r} is not callable; give a lit_align.rewards.RewardFunction, "
                f"a TRL-style reward function, or a list of them"
            )
    if not isinstance(args["skip_special_tokens"], bool):
        raise ValueError(f"model.skip_special_tokens={args['skip_special_tokens']!r} must be true or false")
    for name, allowed in (
        ("model_dtype", (None, "float32", "float16", "bfloat16", "float64")),
        ("loss_aggregation", losses.AGGREGATIONS),
        ("advantage_norm", losses.ADVANTAGE_NORMS),
        ("kl_estimator", losses.KL_ESTIMATORS),
        ("lr_decay", ("constant", "linear", "cosine")),
        ("reward_errors", ("raise", "zero")),
        ("rollout_engine", ENGINES),
    ):
        if args[name] not in allowed:
            raise ValueError(f"model.{name}={args[name]!r}: choose one of {list(allowed)}")
