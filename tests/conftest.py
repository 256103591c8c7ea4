"""Every test starts from the same global random state: tests that draw with torch.randn and no
generator see the same numbers on every run and in any order, so a failure reproduces."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_torch():
    torch.manual_seed(0)
    yield
