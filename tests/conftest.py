import pytest

from tiny import tiny_clip


@pytest.fixture
def clip():
    """A fresh tiny CLIP per test (tests may freeze or train it)."""
    return tiny_clip()
