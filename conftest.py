"""Environment for every test run, `tests/` and the notebooks alike (a notebook's kernel inherits it):
pytest reads this file whichever of the two it collects."""
import os

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():
    # Triton reads this when it is first imported: its kernels defined from then on run
    # on the CPU through its interpreter (tests of the fused_matvec and decode_attention kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")
