import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where there is no GPU.
# Must be set before triton (imported by monoloss_kernels) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .helpers import BACKEND_DEVICES, backend_id  # noqa: E402


@pytest.fixture(params=BACKEND_DEVICES, ids=backend_id)
def backend_device(request):
    """A (backend, device) pair this machine can run; every one is tested."""
    return request.param
