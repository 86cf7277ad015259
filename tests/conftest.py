import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where there is no GPU.
# Must be set before triton (imported by monoloss_kernels) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import monoloss_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# (backend, device) pairs this machine can run: every backend on every device it supports.
BACKEND_DEVICES = [
    (backend, device)
    for device in DEVICES
    for backend in monoloss_kernels.available_backends(torch.device(device))
]


def backend_id(pair):
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture(params=BACKEND_DEVICES, ids=backend_id)
def backend_device(request):
    return request.param
