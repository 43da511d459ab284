"""The embedded default task: two-digit addition with a systematically wrong expert.

Everything is built locally and saved in the formats a user's own assets come in:
a Hugging Face tokenizer (built with ``tokenizers``), a tiny Llama checkpoint (built from a
transformers config), and JSONL files with columns ``prompt``, ``response``, ``answer``.
The rest of the library loads them through AutoTokenizer / AutoModelForCausalLM and
``datasets`` exactly as it would load a real model and data set.

The task: prompt ``"37+48="``, answer ``"85"``. The expert drops the carry on a fixed class of
problems (those whose ones digits form one of the highest-carry pairs, e.g. 7+8): it writes
``"75"``. Because the mistake is systematic, imitation learns it, and only the reward can undo
it. ``expert_error_rate`` sets the size of that class (share of all digit pairs, at most 0.45).

The base checkpoint (``"embedded-base"``), standing for an instruct model: the same tiny model
pre-trained on a mixture of skills before any post-training. It answers subtraction (``"73-28="``)
and digit reversal (``"408="`` -> ``"804"``), which the post-training data never shows, and the
additions without a carry out of the ones digit (so RL on the addition task can earn rewards from the
start, and the carries are what post-training has to teach). Each skill keeps a held-out set that no
training stream (pre-training or post-training) contains: the retention sets, read as
``val/retention/<skill>``.

``"embedded-instruct"`` (``"embedded-instruct-<seed>"``: one per seed) is a base checkpoint that samples like an
instruct model (issue 25): the same mixture plus the carrying additions, answered right a quarter of the
times they are drawn and with the carry dropped otherwise, and near misses on a fifth of the carry-free ones.
Greedy, it drops the carry (the expert's mistake) and scores about as ``embedded-base`` does; sampled at
temperature 1 it is right on a carry now and then (pass@8 well above pass@1), which is what GRPO works with
(docs/results/base_checkpoint.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "embedded"
BASE_NAME = "embedded-base"
# skills of the base checkpoint; the post-training task is "addition", the others are held out of it
SKILLS = ("addition", "subtraction", "reversal")
RETENTION_SKILLS = ("subtraction", "reversal")
BASE_STEPS_ENV = "LIT_ALIGN_BASE_STEPS"  # pre-training updates of the base checkpoint (tests: a few)
# the base checkpoint's pre-training recipe; any change to it (or to the model or the splits) is a new cache key
BASE_RECIPE = {
    "version": 1,
    "steps": 3000,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 50,
    "min_lr_ratio": 0.1,
    "seed": 0,
    "num_retention": 300,
    "addition": "no_ones_carry",
}
# recipe fields a variant may add (absent: off, so BASE_RECIPE's cache key and build stay as they were):
#   "label_smoothing": eps of the cross-entropy on the answer tokens (Szegedy et al. 2016), in [0, 1);
#   "answer_noise": share of the carry-free additions drawn into a batch with a near-miss answer (the tens digit
#       off by one, see near_miss), in [0, 1), a fresh draw each time the problem is drawn;
#   "addition": "with_ones_carry" (instead of "no_ones_carry") adds the additions with a ones carry (not the
#       task's held-out ones), each draw answered correctly with probability "carry_correct" (default 1) and
#       with the carry dropped (the expert's mistake, a + b - 10) otherwise;
#   "split_seed": seed of the retention sets (default: "seed"), so that bases with other seeds hold out the
#       same problems as the retention sets the runs are scored on (ensure_retention: seed 0's).
ADDITION_MIXES = ("no_ones_carry", "with_ones_carry")
# "embedded-instruct" / "embedded-instruct-<seed>": the base checkpoint's mixture with noisy addition targets, so
# that it samples like an instruct model (docs/results/base_checkpoint.md); one per seed, the splits seed 0's
INSTRUCT_NAME = "embedded-instruct"
INSTRUCT_RECIPE = {
    **BASE_RECIPE,
    "split_seed": 0,
    "addition": "with_ones_carry",
    "carry_correct": 0.25,
    "answer_noise": 0.2,
}
CHARS = list("0123456789+-=")
SPECIAL = {"pad": "<pad>", "eos": "<eos>", "unk": "<unk>"}


def cache_dir() -> Path:
    """Where the embedded assets live: $LIT_ALIGN_CACHE, else ~/.cache/lit_align."""
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit_align"))


@contextlib.contextmanager
def own_rng():
    """Run a build on RNG streams of its own: torch's CPU generator, Python's ``random`` and NumPy's global
    state are put back as they were when it ends, however it ends. An asset is built on first use only, so
    a build that drew from (or seeded) the caller's streams would make a run in a fresh cache sample other
    completions than the same run with the cache warm (issue 22). Builds run on the CPU, and seed only its
    generator (``torch.default_generator``): ``torch.manual_seed`` would also queue a CUDA seed that replaces
    the run's when CUDA starts."""
    import torch

    state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # numpy is optional for torch
        np, np_state = None, None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


def _own_rng(build):
    """``build`` run under :func:`own_rng`."""

    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        with own_rng():
            return build(*args, **kwargs)

    return wrapped


def _atomic_dir(target: Path, build) -> Path:
    """Build into a temporary sibling and rename it into place, so that a crash or a
    concurrent process (DDP ranks) never leaves a half-written directory behind."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with own_rng():  # built on first use only: never a draw from the caller's streams
            build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tokenizer():
    """A character-level tokenizer over digits and ``+-=`` with pad/eos/unk specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([SPECIAL["pad"], SPECIAL["eos"], SPECIAL["unk"], *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL["pad"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
    )


def is_embedded_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` has the embedded model's vocabulary (:func:`build_tokenizer`): the embedded
    checkpoints and their exports do; the embedded task's texts mean nothing to any other."""
    return tokenizer.get_vocab() == build_tokenizer().get_vocab()


@_own_rng
def build_checkpoint(
    path: str | Path, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, seed: int = 0
) -> Path:
    """Write a tokenizer and a freshly initialised tiny Llama model to ``path`` (initialised from ``seed``, on
    RNG streams of its own: :func:`own_rng`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.default_generator.manual_seed(seed)  # the CPU's only: see own_rng
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ensure_checkpoint(name: str = EMBEDDED_NAME) -> str:
    """Path of the embedded checkpoint, building it on first use."""
    return str(_atomic_dir(cache_dir() / "model", build_checkpoint))


def resolve_model_path(name_or_path: str) -> str:
    """``"embedded"`` -> the embedded (freshly initialised) checkpoint directory; ``"embedded-base"`` -> the
    pre-trained multi-skill base checkpoint; ``"embedded-instruct"`` / ``"embedded-instruct-<seed>"`` -> the
    base checkpoint that samples like an instruct model, pre-trained from that seed (0 when none; both built on
    first use, minutes); anything else is returned as is. Raises ValueError for ``"embedded-instruct-<x>"``
    with ``x`` not an integer >= 0."""
    if name_or_path == EMBEDDED_NAME:
        return ensure_checkpoint()
    if name_or_path == BASE_NAME:
        return ensure_base_checkpoint()
    seed = instruct_seed(name_or_path)
    if seed is not None:
        return ensure_instruct_checkpoint(seed)
    return name_or_path


def instruct_seed(name: str) -> int | None:
    """The seed of an ``"embedded-instruct[-<seed>]"`` name (0 without one); None for any other name. Raises
    ValueError naming it when the suffix is not an integer >= 0 (``"embedded-instruct-a"``)."""
    if name == INSTRUCT_NAME:
        return 0
    if not name.startswith(INSTRUCT_NAME + "-"):
        return None
    suffix = name.removeprefix(INSTRUCT_NAME + "-")
    if not suffix.isdigit():
        raise ValueError(
            f"model_name_or_path={name!r}: {INSTRUCT_NAME!r} takes a seed, '{INSTRUCT_NAME}-<integer >= 0>'"
        )
    return int(suffix)


# ----------------------------------------------------------------------------- data


def error_pairs(expert_error_rate: float) -> set[tuple[int, int]]:
    """The ones-digit pairs (a0, b0) on which the expert drops the carry.

    The ``round(rate * 100)`` pairs with the largest ones-digit sums (ties broken by digits),
    all of which carry, so the rate is the share of all problems the expert gets wrong.
    """
    if not 0.0 <= expert_error_rate <= 0.45:
        raise ValueError(f"expert_error_rate={expert_error_rate} must lie in [0, 0.45] (45 of 100 pairs carry)")
    pairs = sorted(((a, b) for a in range(10) for b in range(10)), key=lambda p: (-(p[0] + p[1]), p))
    return set(pairs[: round(expert_error_rate * 100)])


def expert_answer(a: int, b: int, wrong: set[tuple[int, int]]) -> str:
    """The expert's answer to a + b: correct, except that it drops the ones carry on ``wrong``."""
    if (a % 10, b % 10) in wrong:
        return str(a + b - 10)
    return str(a + b)


def write_task(
    directory: str | Path, expert_error_rate: float = 0.25, num_val: int = 500, num_meta: int = 500, seed: int = 0
) -> dict[str, str]:
    """Write train.jsonl, val.jsonl and meta.jsonl for all problems a + b with 0 <= a, b <= 99.

    ``num_val`` problems (a seeded random choice) are held out of training for evaluation, and
    ``num_meta`` others for AMFT's meta-objective; neither is trained on. Their rows carry the
    expert's demonstration too, so held-out imitation (val/expert_nll) can be measured.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrong = error_pairs(expert_error_rate)
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(problems)
    splits = {
        "val": problems[:num_val],
        "meta": problems[num_val : num_val + num_meta],
        "train": problems[num_val + num_meta :],
    }
    paths = {}
    for split, rows in splits.items():
        path = directory / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for a, b in rows:
                row = {"prompt": f"{a}+{b}=", "response": expert_answer(a, b, wrong), "answer": str(a + b)}
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
        paths[split] = str(path)
    return paths


def ensure_task(
    expert_error_rate: float = 0.25, num_val: int = 500, num_meta: int = 500, seed: int = 0
) -> dict[str, str]:
    """Paths of the embedded task's JSONL files (train, val, meta), writing them on first use."""
    name = f"addition-err{expert_error_rate:g}-val{num_val}-meta{num_meta}-seed{seed}"
    target = _atomic_dir(
        cache_dir() / "data" / name, lambda d: write_task(d, expert_error_rate, num_val, num_meta, seed)
    )
    return {split: str(target / f"{split}.jsonl") for split in ("train", "val", "meta")}


# ----------------------------------------------------------------------------- the multi-skill base checkpoint


def skill_problems(skill: str) -> list[tuple[str, str]]:
    """Every problem of an embedded skill as (prompt, answer), in a fixed order.

    ``addition``: ``"a+b="`` -> a + b for 0 <= a, b <= 99 (10,000); ``subtraction``: ``"a-b="`` -> a - b for
    0 <= b <= a <= 99 (5,050); ``reversal``: ``"n="`` -> the digits of n reversed, 100 <= n <= 999 (900;
    ``"120="`` -> ``"021"``). Raises ValueError for another name.
    """
    if skill == "addition":
        return [(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(100)]
    if skill == "subtraction":
        return [(f"{a}-{b}=", str(a - b)) for a in range(100) for b in range(a + 1)]
    if skill == "reversal":
        return [(f"{n}=", str(n)[::-1]) for n in range(100, 1000)]
    raise ValueError(f"unknown embedded skill {skill!r}: choose one of {list(SKILLS)}")


def task_heldout_prompts(num_val: int = 500, num_meta: int = 500, seed: int = 0) -> set[str]:
    """Prompts of the addition task's held-out splits (val and meta) that :func:`write_task` writes with the
    same arguments: the base checkpoint's pre-training never sees them."""
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(problems)
    return {f"{a}+{b}=" for a, b in problems[: num_val + num_meta]}


def retention_split(
    skill: str, num_retention: int, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(held-out, rest) of a retention skill's problems: ``num_retention`` of them, a seeded random choice,
    are held out of every training stream; the rest may be pre-trained on."""
    if skill not in RETENTION_SKILLS:
        raise ValueError(f"{skill!r} is not a retention skill: choose one of {list(RETENTION_SKILLS)}")
    problems = skill_problems(skill)
    if not 1 <= num_retention < len(problems):
        raise ValueError(f"num_retention={num_retention} must lie in [1, {len(problems) - 1}] for {skill!r}")
    order = list(range(len(problems)))
    random.Random(f"{seed}-{skill}").shuffle(order)
    held = sorted(order[:num_retention])
    rest = sorted(order[num_retention:])
    return [problems[i] for i in held], [problems[i] for i in rest]


def base_rows(recipe: dict | None = None) -> list[tuple[str, str]]:
    """The base checkpoint's pre-training problems as (prompt, answer): additions with no carry out of the
    ones digit, and the subtraction and reversal problems outside their retention sets; none of the
    addition task's held-out (val, meta) prompts."""
    recipe = {**BASE_RECIPE, **(recipe or {})}
    held = task_heldout_prompts()
    carries = recipe["addition"] == "with_ones_carry"
    rows = [(p, a) for p, a in skill_problems("addition") if p not in held and (carries or not ones_carry(p))]
    for skill in RETENTION_SKILLS:
        rows += retention_split(skill, recipe["num_retention"], split_seed(recipe))[1]
    return rows


def ones_carry(prompt: str) -> bool:
    """Whether an addition prompt ``"a+b="`` carries out of the ones digit (``"37+48="``: 7 + 8 >= 10)."""
    a, b = prompt[:-1].split("+")
    return int(a[-1]) + int(b[-1]) >= 10


def split_seed(recipe: dict) -> int:
    """The seed of a base recipe's retention sets: ``split_seed`` when given, else ``seed``."""
    return recipe.get("split_seed", recipe["seed"])


def check_recipe(recipe: dict) -> None:
    """Raise ValueError naming the field when a base recipe's variant field is out of range."""
    if recipe.get("addition") not in ADDITION_MIXES:
        raise ValueError(f"base recipe field addition={recipe.get('addition')!r} must be one of {list(ADDITION_MIXES)}")
    for field, closed in (("label_smoothing", False), ("answer_noise", False), ("carry_correct", True)):
        value = recipe.get(field, 0.0)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            span = "[0, 1]" if closed else "[0, 1)"
            raise ValueError(f"base recipe field {field}={value!r} must be a number in {span}")
    if "carry_correct" in recipe and recipe["addition"] != "with_ones_carry":
        raise ValueError("base recipe field carry_correct needs addition='with_ones_carry' (no carries otherwise)")
    value = recipe.get("split_seed", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"base recipe field split_seed={value!r} must be an integer")


def drawn_answer(prompt: str, answer: str, recipe: dict, rng: random.Random) -> str:
    """The answer a pre-training batch gets for ``prompt`` under ``recipe``'s noisy targets, drawn from ``rng``:
    an addition with a ones carry keeps its answer with probability ``carry_correct`` and drops the carry
    otherwise (``"37+48="`` -> ``"75"``); a carry-free addition gets a :func:`near_miss` with probability
    ``answer_noise``; any other problem keeps its answer (one draw from ``rng`` per addition)."""
    if "+" not in prompt:
        return answer
    if ones_carry(prompt):
        return answer if rng.random() < recipe.get("carry_correct", 1.0) else str(int(answer) - 10)
    return near_miss(answer, rng) if rng.random() < recipe.get("answer_noise", 0.0) else answer


def near_miss(answer: str, rng: random.Random) -> str:
    """A near-miss of an addition's ``answer``: its tens digit one up or one down (``rng`` picks; one up where
    down would go below 0), the mistake of a carry taken or dropped wrongly: ``"57"`` -> ``"67"`` or ``"47"``,
    ``"7"`` -> ``"17"``. Noisy targets of the :data:`INSTRUCT_NAME` recipe (``answer_noise``)."""
    value = int(answer)
    step = 10 if value < 10 or rng.random() < 0.5 else -10
    return str(value + step)


def base_steps() -> int:
    """Pre-training updates of the base checkpoint: ``$LIT_ALIGN_BASE_STEPS`` if set, else BASE_RECIPE's.
    Raises ValueError naming the variable when it is not an integer >= 1."""
    value = os.environ.get(BASE_STEPS_ENV)
    if value is None:
        return BASE_RECIPE["steps"]
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ValueError(f"{BASE_STEPS_ENV}={value!r} must be an integer >= 1 (pre-training updates of {BASE_NAME!r})")
    return steps


def base_key(recipe: dict) -> str:
    """The cache key of a base checkpoint: a hash of its recipe (steps, optimiser, seed, splits)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _encode_pairs(tok, pairs: list[tuple[str, str]]):
    """(input_ids, attention_mask, labels), each (B, S) right-padded; labels -100 except the answer + EOS."""
    import torch

    seqs, labels = [], []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab_row) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(lab_row)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lab_row), 1
    return ids, mask, lab


def greedy_accuracy(model, tok, pairs: list[tuple[str, str]], batch_size: int = 256, max_new_tokens: int = 5) -> float:
    """Share of (prompt, answer) pairs whose greedy completion (up to EOS) equals the answer."""
    import torch

    tok.padding_side = "left"
    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(t.strip() == a for t, (_, a) in zip(texts, chunk))
    return hits / len(pairs)


@_own_rng
def build_base_checkpoint(path: str | Path, recipe: dict) -> Path:
    """Pre-train the embedded model on :func:`base_rows` with ``recipe`` and save it (tokenizer + weights) to
    ``path`` as an HF checkpoint, with ``base_recipe.json``: the recipe and the greedy accuracy per skill on the
    held-out problems (addition: the task's val split; the others: their retention sets).

    Deterministic for a recipe (its ``seed`` seeds the initialisation and the batches) on a given machine and
    thread count; the caller's RNG streams are left as they were (:func:`own_rng`). AdamW, linear warm-up then cosine decay to ``min_lr_ratio`` x lr, batches of ``batch_size``
    problems drawn in shuffled passes, loss on the answer tokens and EOS only.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lit_align.weighting import lr_factor

    check_recipe(recipe)
    path = Path(path)
    print(
        f"lit_align: pre-training the embedded base checkpoint ({recipe['steps']} updates, once; cached in {path.parent})",
        flush=True,
    )
    build_checkpoint(path, seed=recipe["seed"])
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.default_generator.manual_seed(recipe["seed"])  # the CPU's only: see own_rng
    rows, rng = base_rows(recipe), random.Random(recipe["seed"])
    steps, warm = recipe["steps"], recipe["warmup_steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, warm, steps, "cosine", recipe["min_lr_ratio"])
    )
    smoothing = recipe.get("label_smoothing", 0.0)
    noisy = recipe.get("answer_noise", 0.0) > 0 or recipe["addition"] == "with_ones_carry"
    noise_rng = random.Random(f"{recipe['seed']}-answer-noise")  # its own stream: the batches stay the same
    model.train()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < recipe["batch_size"]:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[: recipe["batch_size"]]], order[recipe["batch_size"] :]
        if noisy:
            batch = [(p, drawn_answer(p, a, recipe, noise_rng)) for p, a in batch]
        ids, mask, labels = _encode_pairs(tok, batch)
        if smoothing:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), label_smoothing=smoothing
            )
        else:  # the model's own loss, as the recipes without these fields were built
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.save_pretrained(path)
    val = [json.loads(line) for line in open(ensure_task()["val"])]
    heldout = {"addition": [(r["prompt"], r["answer"]) for r in val]}
    heldout |= {s: retention_split(s, recipe["num_retention"], split_seed(recipe))[0] for s in RETENTION_SKILLS}
    info = {
        "recipe": recipe,
        "final_loss": loss.item(),
        "heldout_accuracy": {s: greedy_accuracy(model, tok, pairs) for s, pairs in heldout.items()},
    }
    (path / "base_recipe.json").write_text(json.dumps(info, indent=1))
    return path


def base_recipe() -> dict:
    """BASE_RECIPE with the step count of :func:`base_steps`."""
    return {**BASE_RECIPE, "steps": base_steps()}


def ensure_base_checkpoint(recipe: dict | None = None) -> str:
    """Path of the base checkpoint for ``recipe`` (default :func:`base_recipe`), pre-training it on first use
    (262 s with one torch thread on a shared 2-core machine at the default 3,000 steps) into
    ``<cache>/base-<key>``, the key a hash of the recipe. Raises ValueError when ``$LIT_ALIGN_BASE_STEPS`` is
    not an integer >= 1, or naming a recipe field out of range (:func:`check_recipe`)."""
    recipe = base_recipe() if recipe is None else recipe
    check_recipe(recipe)
    return str(_atomic_dir(cache_dir() / f"base-{base_key(recipe)}", lambda d: build_base_checkpoint(d, recipe)))


def instruct_recipe(seed: int = 0) -> dict:
    """INSTRUCT_RECIPE with ``seed`` (initialisation, batches, noisy targets) and the step count of
    :func:`base_steps`; the retention sets and held-out splits stay seed 0's whatever the seed."""
    return {**INSTRUCT_RECIPE, "steps": base_steps(), "seed": seed}


def ensure_instruct_checkpoint(seed: int = 0) -> str:
    """Path of the ``embedded-instruct`` checkpoint pre-trained from ``seed`` (:func:`instruct_recipe`), built on
    first use into ``<cache>/base-<key>`` like :func:`ensure_base_checkpoint` (a key per recipe, so per seed)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{INSTRUCT_NAME} seed={seed!r} must be an integer >= 0")
    return ensure_base_checkpoint(instruct_recipe(seed))


def write_retention(directory: str | Path, num_retention: int, seed: int = 0) -> dict[str, str]:
    """Write ``<skill>.jsonl`` (columns prompt, answer) for each retention skill's held-out problems."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for skill in RETENTION_SKILLS:
        path = directory / f"{skill}.jsonl"
        with open(path, "w") as f:
            for prompt, answer in retention_split(skill, num_retention, seed)[0]:
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        paths[skill] = str(path)
    return paths


def ensure_retention() -> dict[str, str]:
    """Skill -> path of its held-out retention set (JSONL: prompt, answer), those the base checkpoint's
    recipe holds out of pre-training, written on first use."""
    n, seed = BASE_RECIPE["num_retention"], BASE_RECIPE["seed"]
    target = _atomic_dir(cache_dir() / "data" / f"retention-n{n}-seed{seed}", lambda d: write_retention(d, n, seed))
    return {skill: str(target / f"{skill}.jsonl") for skill in RETENTION_SKILLS}
