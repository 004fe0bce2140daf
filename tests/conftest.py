import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.  The variable must
# be set before any triton.jit function is created, i.e. before fastpeft's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
