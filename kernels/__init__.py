"""Fused Triton kernels for PlanRec (see kernels/personalized_scm.py).

Importing this package needs neither a GPU nor an interpreter: on CPU tensors without
TRITON_INTERPRET=1, kernels.personalized_scm falls back to planrec.personalized_scm.
"""

from .personalized_scm import personalized_scm

__all__ = ["personalized_scm"]
