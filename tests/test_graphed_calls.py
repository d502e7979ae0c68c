"""graphed_calls.capturing: no garbage collection while a CUDA graph is captured."""
import contextlib
import gc

import pytest
import torch

from chatterbox_lab import graphed_calls


@pytest.mark.parametrize("enabled_before", [True, False])
@pytest.mark.parametrize("body_fails", [False, True])
def test_capturing_pauses_the_collector_and_restores_it(monkeypatch, enabled_before, body_fails):
    seen = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None):
        seen.append(gc.isenabled())
        yield
        seen.append(gc.isenabled())

    monkeypatch.setattr(torch.cuda, "graph", graph)
    was_enabled = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        with contextlib.suppress(RuntimeError), graphed_calls.capturing(object()):
            if body_fails:
                raise RuntimeError("a failed capture")
        assert gc.isenabled() == enabled_before
    finally:
        (gc.enable if was_enabled else gc.disable)()
    assert seen[0] is False and (body_fails or seen == [False, False])
