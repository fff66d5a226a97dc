"""Shared pytest setup.

Triton's interpreter (TRITON_INTERPRET=1) must be chosen before anything imports triton, so it is
chosen here, at collection time: on a machine without CUDA the fused kernels then run on CPU tensors.
Importing torch does not import triton, so torch can be asked whether CUDA is present.
"""

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
