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
