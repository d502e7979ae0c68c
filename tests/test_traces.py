"""The committed traces open in TensorBoard: its profiler plugin's own loader reads one, and counts
the same kernels as our trace reader (`profiling.kernel_spans`)."""
from collections import Counter
from pathlib import Path

import pytest

from chatterbox_lab.measure import profiling

TRACES = Path(__file__).resolve().parent.parent / "data" / "traces"
# A small trace of one recommended rung: our Triton kernels and the few PyTorch ones left.
TRACE = TRACES / "h100" / "folded_prologue.pt.trace.json.gz"


def test_tensorboard_profiler_plugin_loads_a_committed_trace(tmp_path):
    pytest.importorskip("torch_tb_profiler", reason="the tensorboard extra: pip install -e '.[tensorboard]'")
    from torch_tb_profiler import io
    from torch_tb_profiler.profiler.loader import RunLoader

    # TensorBoard's layout, as `tensorboard --logdir data/traces` sees it: a folder per run, a
    # `<worker>.pt.trace.json.gz` per worker. One trace keeps the loader to one parsing process.
    run_dir = tmp_path / "h100"
    run_dir.mkdir()
    (run_dir / TRACE.name).symlink_to(TRACE)
    run = RunLoader("h100", str(run_dir), io.Cache()).load()

    # The loader logs a parse failure and returns a run without the worker, so check it is there.
    assert run.workers == ["folded_prologue"], "the plugin could not parse the trace (see its log above)"
    assert {"overall", "kernel", "trace"} <= {view.name for view in run.views}
    table = run.get_profile("folded_prologue", "default").kernel_table["data"]
    name, calls = (next(i for i, column in enumerate(table["columns"]) if column["name"] == wanted)
                   for wanted in ("Name", "Calls"))
    seen_by_plugin = {row[name]: row[calls] for row in table["rows"]}
    ours = Counter(kernel for kernel, _, _ in profiling.kernel_spans(profiling.load_trace(TRACE)))
    assert seen_by_plugin == dict(ours)
    assert "_matvec_kernel" in seen_by_plugin
