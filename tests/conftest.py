import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present.
# It must be set before any spear_kernels Triton module is imported (it is read at @triton.jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(False)
