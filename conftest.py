"""Environment for every test run, `tests/` and the notebooks alike (a notebook's kernel inherits it):
pytest reads this file whichever of the two it collects."""
import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():
    # Triton reads this when it is first imported: its kernels defined from then on run
    # on the CPU through its interpreter (tests of the fused_matvec and decode_attention kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Figures a test measures (the prose statistics, for one) that belong in the test log: `make test` prints them
# after pytest's summary, where `-s` is not needed to see them.
_LOG_LINES = pytest.StashKey[list]()


@pytest.fixture
def log_line(request):
    """`log_line(text)` adds a line to the "measured by the tests" section at the end of the test log."""
    return request.config.stash.setdefault(_LOG_LINES, []).append


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(_LOG_LINES, [])
    if lines:
        terminalreporter.section("measured by the tests")
        for line in lines:
            terminalreporter.write_line(line)
