import os
import tempfile

import pytest

# One embedded checkpoint and task per test session, never the user's cache.
os.environ["LIT_ALIGN_CACHE"] = tempfile.mkdtemp(prefix="lit_align_test_cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ckpt() -> str:
    from lit_align.data.embedded import ensure_checkpoint

    return ensure_checkpoint()


@pytest.fixture(scope="session")
def task() -> dict:
    from lit_align.data.embedded import ensure_task

    return ensure_task()
