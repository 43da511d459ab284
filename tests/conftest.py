import os
import tempfile

import pytest

# One embedded checkpoint and task per test session, never the user's cache.
os.environ["LIT_ALIGN_CACHE"] = tempfile.mkdtemp(prefix="lit_align_test_cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the base checkpoint (embedded-base) pre-trained for a few updates only: built in seconds, cached per session
os.environ.setdefault("LIT_ALIGN_BASE_STEPS", "30")


@pytest.fixture(scope="session")
def ckpt() -> str:
    from lit_align.data.embedded import ensure_checkpoint

    return ensure_checkpoint()


@pytest.fixture(scope="session")
def task() -> dict:
    from lit_align.data.embedded import ensure_task

    return ensure_task()


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> str:
    """A small random Qwen2 checkpoint with a ChatML chat template whose tokenizer knows GSM8K-style text."""
    from _gsm8k import build_chat_checkpoint, gsm8k_rows

    texts = [t for r in gsm8k_rows(60) for t in r.values()]
    return build_chat_checkpoint(tmp_path_factory.mktemp("chat_ckpt"), texts)


@pytest.fixture(scope="session")
def base_chat_ckpt(tmp_path_factory) -> str:
    """As ``chat_ckpt``, but with a base checkpoint's EOS, ``<|endoftext|>``, beside the ChatML template whose
    turns end with ``<|im_end|>`` (Qwen base checkpoints)."""
    from _gsm8k import build_chat_checkpoint, gsm8k_rows

    texts = [t for r in gsm8k_rows(60) for t in r.values()]
    return build_chat_checkpoint(tmp_path_factory.mktemp("base_chat_ckpt"), texts, eos="<|endoftext|>")
