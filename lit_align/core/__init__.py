"""The composed core every method module is built from.

- :mod:`~lit_align.core.policy`: the model, its frozen reference, the tokenizer and the ONE forward
  that gives log-probs of target tokens (rollout rows, expert rows, prefix rows, validation);
- :mod:`~lit_align.core.sampler`: completions of prompts (optionally continuing a given prefix) from
  lit-align's HF sampler or a colocated vLLM engine, as one :class:`~lit_align.rollout.Rollout`;
- :mod:`~lit_align.core.buffer`: one rollout batch reused over ``steps_per_generation`` x
  ``num_iterations`` updates, with its own state for an exact resume;
- :mod:`~lit_align.core.engine`: one update's loss terms over micro-batches and ranks with exact global
  normalisation and one gradient sync;
- :mod:`~lit_align.core.terms`: the loss terms methods state (RL over rollout rows, SFT over
  demonstrations) and their weighted sums;
- :mod:`~lit_align.core.dynamic_sampling`: DAPO's dynamic sampling over rounds of sampled groups (which
  groups carry a signal; rounds cut to some groups and joined);
- :mod:`~lit_align.core.heldout`: validation (greedy accuracy, retention sets, held-out expert NLL);
- :mod:`~lit_align.core.settings`: the one validation style of every setting.

No part imports Lightning's module or calls back into the module that drives it; each is handed what
it needs (the policy, a :class:`~lit_align.core.world.World` for ranks and backward, settings).
"""
