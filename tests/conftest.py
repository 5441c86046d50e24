"""Shared pytest settings for the unit tests."""

import torch

# The unit tests use tiny tensors, for which one intra-op thread is faster than several.
torch.set_num_threads(1)
