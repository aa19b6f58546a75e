import os

import numpy as np
import pytest
import torch

# The Triton kernels run in the interpreter on CPU. Set it before any module imports triton (importing
# torch._dynamo does, so any test module could): kernels decorated before it is set are compiled functions.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng(request):
    """A fresh random generator per test; the seed is printed on failure so a case can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
