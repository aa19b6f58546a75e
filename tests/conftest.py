import numpy as np
import pytest
import torch


@pytest.fixture
def rng(request):
    """A fresh random generator per test; the seed is printed on failure so a case can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
