"""Compression Error Theory (CET): Hessian-guided mixed-precision quantization.

The book that derives and measures each step lives in ``book/``; this package contains all its code.
"""

__version__ = "0.1.0"
