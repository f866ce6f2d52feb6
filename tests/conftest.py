import os

import pytest

# Tests never read a developer's key; masking uses a fixed test key unless a test says otherwise.
os.environ.setdefault("HEADWATER_MASK_KEY", "test-key-0123456789abcdef0123456789abcdef")


@pytest.fixture(autouse=True)
def _local_state_cache():
    """Tests run the FnApiRunner in-process: apply headwater's local state-cache default like `run()` does."""
    from ingest.pipeline import _configure_local_state_cache

    _configure_local_state_cache([])
    yield
