"""Determinism in one place: seeds, cuDNN flags and the TF32 policy."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (all devices) and choose deterministic kernels.

    With ``deterministic`` set, cuDNN autotuning is off, TF32 is disabled (it keeps 10 mantissa bits,
    too coarse for Hessian-vector products compared across devices), and PyTorch is asked for
    deterministic algorithms. Operations without a deterministic implementation then warn instead of
    failing, so a CUDA run can still differ between repetitions in those operations.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
