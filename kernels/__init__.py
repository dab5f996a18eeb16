"""Faster implementations of two functions of planrec.py, each with the spec's signature:

    personalized_scm   fused Triton kernels for Eq. (11)-(13) (kernels/personalized_scm.py)
    factor_mlps        g of Eq. (8) and (14) in cache-sized chunks, for CPU (kernels/factor_mlps.py)

Importing this package needs neither a GPU nor an interpreter nor Triton: on CPU tensors without
TRITON_INTERPRET=1, kernels.personalized_scm falls back to planrec.personalized_scm, and
factor_mlps is plain torch. The names kernels.personalized_scm and kernels.factor_mlps are the
functions; importlib.import_module("kernels.factor_mlps") gives the module (e.g. G_CHUNK_ROWS).
"""

from .factor_mlps import factor_mlps

try:    # kernels/personalized_scm.py guards its own triton import; this keeps factor_mlps usable regardless
    from .personalized_scm import personalized_scm
except ImportError:     # pragma: no cover - then `from kernels import personalized_scm` raises ImportError
    __all__ = ["factor_mlps"]
else:
    __all__ = ["personalized_scm", "factor_mlps"]
