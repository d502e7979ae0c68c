"""Device memory by part: storages counted once, nothing reported on the CPU."""
import torch

from chatterbox_lab.measure.memory import module_bytes, resident_parts_mib


def test_module_bytes_counts_each_storage_once():
    fused = torch.zeros(6, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 3, bias=False))
    for i, linear in enumerate(model):  # two weights as views of one matrix, as fused projections make them
        linear.weight = torch.nn.Parameter(fused[3 * i:3 * i + 3], requires_grad=False)
    model.register_buffer("table", torch.zeros(10))
    seen = set()
    assert module_bytes(model, "cpu", seen) == (24 + 10) * 4
    assert module_bytes(model[0], "cpu", seen) == 0  # already counted
    assert module_bytes(model, "meta") == 0  # nothing on that device


def test_no_parts_on_the_cpu(tiny_tts):
    assert resident_parts_mib(tiny_tts) is None
