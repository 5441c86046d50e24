"""Determinism in one place: seeds, cuDNN flags and the TF32 policy."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (all devices) and choose deterministic kernels.

    With ``deterministic`` set, cuDNN autotuning is off and TF32 is disabled: TF32 keeps 10 mantissa bits,
    which is too coarse for Hessian-vector products compared across devices.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
