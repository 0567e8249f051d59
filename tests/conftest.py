"""Process-wide test settings, applied before pytest imports any test module."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run under Triton's interpreter on a CPU (tests/test_triton_kernels.py). The flag must be
    # set before triton's first import anywhere in the process (torch.compile's inductor imports it): the
    # @triton.jit helpers of triton.language itself (tl.cdiv, ...) are bound as compiled or interpreted
    # functions at that import, and a compiled one cannot be called from an interpreted kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")
