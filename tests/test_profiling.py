"""A profiled run leaves no profiler chatter in what a notebook or a log shows."""
import subprocess
import sys


def test_a_profiled_run_writes_no_profiler_markers_to_stderr():
    # Kineto writes its markers from C++ straight to the process's stderr, so only a fresh process
    # sees them; pytest's capture of sys.stderr would not.
    code = ("import torch\nfrom chatterbox_lab.measure import profiling\n"
            "print(profiling.profile_run(lambda: torch.ones(3) + 1)['cpu_ops'] > 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert "profiler_start" not in run.stderr and "USDT" not in run.stderr, run.stderr


def test_upstream_eager_steps_split_at_each_vocabulary_sort():
    from chatterbox_lab.measure import step_trace

    def kernel(name, ts):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": 1.0}

    sort = f"void cub::{step_trace.SORT_PASS}<int>"
    events = [kernel("gemm", 0.0)] + [kernel(name, 100.0 * step + offset) for step in range(1, 6)
                                      for name, offset in (("gemm", 0.0), (sort, 50.0), ("softmax", 60.0))]
    # Only the trace's second half is decode for certain: its first half may hold the prefill.
    assert step_trace.step_boundaries({"traceEvents": events}) == [350.0, 450.0, 550.0]
    assert step_trace.step_lengths_us({"traceEvents": events}) == [100.0, 100.0]

