import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests import naive_spa and helpers directly

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter. Triton picks interpreter or
# compiler when a kernel is decorated, so this must hold before any test imports a kernel
# module (a test that fakes torch.cuda.is_available() could otherwise import them compiled).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
