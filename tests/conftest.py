"""Triton kernels run on CPU tensors through Triton's interpreter; it is chosen when a kernel is defined, so the
switch must be set before any test imports one. Machines with a GPU compile them as usual."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
