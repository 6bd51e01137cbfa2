"""Where there is no GPU, ISOPO's Triton kernels (algorithms/isopo/kernels.py) run in Triton's interpreter
for tests/test_kernels.py: TRITON_INTERPRET must be set before Triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
