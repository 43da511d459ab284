"""How a starting checkpoint samples on the embedded task: pass@1, pass@8, sampling entropy, greedy accuracy.

    python benchmarks/base_sampling.py --model embedded-base
    python benchmarks/base_sampling.py --recipe '{"answer_noise": 0.3}'   # a base recipe variant, built if needed
    python benchmarks/base_sampling.py --quick                          # smoke test: a few problems, samples

On the post-training task's held-out val split (500 additions, none pre-trained on) it samples ``--samples`` (n)
answers per problem at temperature 1 with the sampler training uses (:func:`lit_align.rollout.generate`, no
top-k / top-p, ``--max-new-tokens`` as the configs), judges them by val/accuracy's rule (exact answer), and
prints JSON with:

- ``pass@k`` for k = 1 and 8: the unbiased estimator of Chen et al. 2021 (:func:`lit_align.core.heldout.pass_at_k`)
  from the n samples, mean over problems; also split into the problems with and without a carry out of the
  ones digit (``carry`` / ``no_carry``: the base checkpoints pre-train on the latter only);
- ``entropy``: mean token entropy (nats) of the sampling distribution at temperature 1 over the sampled answer
  tokens (EOS included: the tokens the policy samples), as ``train/entropy`` averages them;
- ``frac_reward_zero_std``: share of groups of 8 samples (the configs' G) whose rewards are all equal (all
  right or all wrong: no GRPO signal), as ``train/frac_reward_zero_std`` counts them;
- ``greedy``: greedy accuracy on the val split and on each retention set (``retention/<skill>``, as
  ``val/retention/<skill>``).

``--recipe`` (JSON) is merged into the base recipe (``embedded.BASE_RECIPE``; with ``--instruct`` into
``embedded.INSTRUCT_RECIPE``) and the checkpoint built into the cache like ``embedded-base`` (a new key per
recipe; minutes). Sampling is seeded (``--sample-seed``) on a generator of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_align.data import embedded  # noqa: E402

KS = (1, 8)


def _encode(tok, prompts: list[str]):
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"].to(torch.long)


def sample(model, tok, rows: list[dict], n: int, max_new_tokens: int, batch_prompts: int) -> dict:
    """n answers per row at temperature 1; (P, n) correctness and the token entropies of the sampled answers."""
    import torch

    from lit_align.rewards import ExactAnswerReward
    from lit_align.rollout import generate

    judge = ExactAnswerReward()
    correct, ent_sum, ent_tokens = [], 0.0, 0
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i : i + batch_prompts]
        ids, mask = _encode(tok, [r["prompt"] for r in chunk])
        with torch.no_grad():
            out = generate(model, tok, ids, mask, num_generations=n, max_new_tokens=max_new_tokens, temperature=1.0)
        answers = [r["answer"] for r in chunk for _ in range(n)]
        prompts = [r["prompt"] for r in chunk for _ in range(n)]
        correct.append(judge.correct(prompts, out.completions, answers).reshape(len(chunk), n).bool())
        m = out.completion_mask.bool()
        ent_sum += float(out.entropy[m].double().sum())
        ent_tokens += int(m.sum())
    return {"correct": torch.cat(correct), "entropy": ent_sum / max(ent_tokens, 1), "tokens": ent_tokens}


def greedy(model, tok, rows: list[dict], max_new_tokens: int, batch_prompts: int) -> float:
    """Greedy accuracy (val/accuracy's rule) on ``rows``."""
    import torch

    from lit_align.rewards import ExactAnswerReward
    from lit_align.rollout import generate

    judge, hits = ExactAnswerReward(), 0
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i : i + batch_prompts]
        ids, mask = _encode(tok, [r["prompt"] for r in chunk])
        with torch.no_grad():
            out = generate(model, tok, ids, mask, max_new_tokens=max_new_tokens, greedy=True)
        hits += int(judge.correct([r["prompt"] for r in chunk], out.completions, [r["answer"] for r in chunk]).sum())
    return hits / len(rows)


def measure(
    path: str, n: int = 16, max_new_tokens: int = 4, limit: int | None = None, seed: int = 0, batch_prompts: int = 64
) -> dict:
    """The numbers of the module docstring for the checkpoint at ``path`` (``limit``: the first problems of
    each set only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_align.core.heldout import pass_at_k

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    val = [json.loads(line) for line in open(embedded.ensure_task()["val"])][:limit]
    retention = {
        skill: [json.loads(line) for line in open(p)][:limit] for skill, p in embedded.ensure_retention().items()
    }
    with embedded.own_rng():
        torch.default_generator.manual_seed(seed)
        drawn = sample(model, tok, val, n, max_new_tokens, batch_prompts)
    correct = drawn["correct"]  # (P, n)
    carry = torch.tensor([embedded.ones_carry(r["prompt"]) for r in val])
    counts = correct.sum(1)
    result = {"n": n, "problems": len(val), "carry_problems": int(carry.sum())}
    for k in KS:
        if k > n:
            continue
        per = pass_at_k(n, counts, k)
        result[f"pass@{k}"] = float(per.mean())
        for name, sel in (("carry", carry), ("no_carry", ~carry)):
            result[f"pass@{k}/{name}"] = float(per[sel].mean()) if sel.any() else float("nan")
    result["entropy"] = drawn["entropy"]
    result["sampled_tokens"] = drawn["tokens"]
    g = min(8, n)
    groups = correct[:, : n - n % g].reshape(-1, g)  # the n samples of a problem as groups of G
    result["frac_reward_zero_std"] = float((groups.all(1) | ~groups.any(1)).float().mean())
    result["greedy"] = {"accuracy": greedy(model, tok, val, max_new_tokens, batch_prompts)}
    for skill, rows in retention.items():
        result["greedy"][f"retention/{skill}"] = greedy(model, tok, rows, max_new_tokens, batch_prompts)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint path or embedded name (default: embedded-base)")
    parser.add_argument("--recipe", default=None, help="JSON merged into the base recipe; built if not cached")
    parser.add_argument("--instruct", action="store_true", help="--recipe is merged into INSTRUCT_RECIPE")
    parser.add_argument("--samples", type=int, default=16, help="n, answers sampled per problem")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 24 problems per set, n = 8")
    args = parser.parse_args(argv)
    if args.model and args.recipe:
        parser.error("--model and --recipe: give one (a checkpoint, or a recipe to build)")
    if args.recipe is not None:
        start = embedded.INSTRUCT_RECIPE if args.instruct else embedded.base_recipe()
        recipe = {**start, **json.loads(args.recipe)}
        path = embedded.ensure_base_checkpoint(recipe)
    else:
        recipe = None
        path = embedded.resolve_model_path(args.model or embedded.BASE_NAME)
    n, limit = (8, 24) if args.quick else (args.samples, None)
    t0 = time.perf_counter()
    result = measure(path, n=n, max_new_tokens=args.max_new_tokens, limit=limit, seed=args.sample_seed)
    result = {
        "command": "python benchmarks/base_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "checkpoint": path,
        "recipe": recipe if recipe is not None else _stored_recipe(path),
        **result,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    return result


def _stored_recipe(path: str):
    """The recipe a base checkpoint was built with (its base_recipe.json), None for another checkpoint."""
    info = Path(path) / "base_recipe.json"
    return json.loads(info.read_text())["recipe"] if info.exists() else None


if __name__ == "__main__":
    main()
