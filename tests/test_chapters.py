"""The chapters past the guide: which steps each teaches, the records they read, and the step view
of a trace."""
import json

import matplotlib
import pytest

from chatterbox_lab import registry
from chatterbox_lab.measure import step_trace
from chatterbox_lab.records import chapters, report

matplotlib.use("Agg")


def test_every_step_past_the_guide_is_taught_by_exactly_one_chapter():
    taught = [name for steps in chapters.CHAPTERS.values() for name in steps]
    assert len(taught) == len(set(taught))
    past_guide = {name for name in registry.T3_STEPS if registry.STEPS[name].status == "recommended"
                  or registry.STEPS[name].evidence}
    assert set(taught) == past_guide


def test_the_appendix_is_every_step_a_record_measured_slower():
    slower = chapters.chapter_steps("06e_measured_slower")
    assert slower and all(registry.STEPS[name].status == "experimental" for name in slower)
    for found in chapters.slower_steps():
        assert found.record == registry.STEPS[found.step].evidence
        assert registry.STEPS[found.baseline].status != "experimental"


def test_each_chapter_has_its_notebook_in_the_catalog():
    listed = {entry["file"] for entry in report.notebook_catalog()}
    assert {f"{chapter}.ipynb" for chapter in chapters.CHAPTERS} <= listed


def test_an_unknown_chapter_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="06a_fused_kernels"):
        chapters.chapter_steps("06_beyond")


def test_a_chapter_record_holds_every_rung_when_one_record_does():
    path, doc = chapters.chapter_record(["staged_weights", "multi_step_graph", "folded_prologue"])
    assert {"staged_weights", "multi_step_graph", "folded_prologue"} <= set(doc["rungs"])
    assert doc["provenance"]["gpu"] == chapters.CARD
    newer = [d for _, d in chapters._records(chapters.CARD) if d["provenance"]["date_utc"] > doc["provenance"]["date_utc"]]
    assert not any({"staged_weights", "multi_step_graph", "folded_prologue"} <= set(d["rungs"]) for d in newer)


def test_a_chapter_record_falls_back_to_the_record_holding_the_most_rungs():
    rungs = ("fused_matvec", "fused_attention", "fused_sampling")
    _, doc = chapters.chapter_record(rungs)
    held = sum(rung in doc["rungs"] for rung in rungs)
    assert held >= 2 and all(sum(r in d["rungs"] for r in rungs) <= held for _, d in chapters._records(None))
    with pytest.raises(LookupError):
        chapters.chapter_record(["no_such_rung"])


def test_a_gain_is_within_one_process_against_the_rung_before_it():
    assert chapters.rung_before("launch_ahead") == "dependent_launch"
    gain = chapters.step_gain("launch_ahead")
    ratios = [d["rungs"]["launch_ahead"]["t3_decode_tok_s"] / d["rungs"]["dependent_launch"]["t3_decode_tok_s"]
              for _, d in chapters._records(chapters.CARD) if {"launch_ahead", "dependent_launch"} <= set(d["rungs"])]
    assert gain.records == len(ratios) and gain.low == min(ratios) and gain.high == max(ratios)
    with pytest.raises(ValueError, match="experimental"):
        chapters.rung_before("head_handoff")
    assert "not measured in one process" in chapters.gains_table(["prefill_graph"])


def _trace(steps: int, sampling: bool) -> dict:
    """A trace of `steps` decode steps of three kernels each (50 us apart), ending with the sampling
    kernel or, without `sampling`, each step one graph launch."""
    events, t = [], 1000.0
    for step in range(steps):
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t - 5, "dur": 2,
                       "args": {"correlation": step}})
        for name in ("_matvec_kernel", "_decode_attention_kernel", "_sample_kernel" if sampling else "sort"):
            events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": 40, "args": {"correlation": step}})
            t += 50
    return {"traceEvents": events}


@pytest.mark.parametrize("sampling", [True, False])
def test_step_boundaries_split_a_trace_into_its_steps(sampling):
    lengths = step_trace.step_lengths_us(_trace(6, sampling))
    assert lengths and all(length == 150 for length in lengths)


def test_a_trace_without_steps_to_split_is_refused():
    trace = {"traceEvents": [{"ph": "X", "cat": "kernel", "name": "gemm", "ts": t, "dur": 5} for t in range(0, 100, 10)]}
    with pytest.raises(ValueError, match="decode of several tokens"):
        step_trace.step_boundaries(trace)


def test_plot_steps_draws_rows_on_one_axis_and_refuses_too_many_steps():
    traces = {"a": _trace(5, True), "b": _trace(5, False)}
    fig = step_trace.plot_steps(traces, steps=2)
    assert [label.get_text() for label in fig.axes[0].get_yticklabels()] == ["b", "a"]
    with pytest.raises(ValueError, match="at most"):
        step_trace.plot_steps(traces, steps=50)


def test_a_committed_trace_splits_into_steps_of_one_length():
    from chatterbox_lab.measure import profiling

    lengths = step_trace.step_lengths_us(profiling.load_trace(
        chapters.results.RESULTS_DIR.parents[1] / "data/traces/h100/folded_prologue.pt.trace.json.gz"))
    assert len(lengths) >= 4 and max(lengths) < 1.1 * min(lengths)
    json.dumps(lengths)


def test_the_chapters_record_is_asked_for_every_taught_rung_the_bench_knows():
    from chatterbox_lab.measure.bench import RUNGS

    rungs = chapters.bench_rungs()
    assert set(rungs) <= set(RUNGS)
    taught = {n for n in (name for steps in chapters.CHAPTERS.values() for name in steps)
              if registry.STEPS[n].status == "recommended"}
    assert taught <= set(rungs)


def test_a_new_record_is_read_step_by_step_against_the_rung_before_it():
    doc = {"rungs": {"dependent_launch": {"t3_decode_tok_s": 1000.0}, "launch_ahead": {"t3_decode_tok_s": 1100.0},
                     "recommended": {"t3_decode_tok_s": 1600.0}, "head_handoff": {"t3_decode_tok_s": 1400.0}}}
    table = chapters.record_gains_table(doc)
    assert "| `launch_ahead` | 1,100 | `dependent_launch` | 1.100x |" in table
    assert "| `head_handoff` | 1,400 | `recommended` | 0.875x |" in table
    assert "| `dependent_launch` | 1,000 | `captured_graph` | - |" in table


def test_a_gain_reads_as_one_sentence_with_its_record_count():
    assert chapters.gain_line("launch_ahead").startswith("launch_ahead over dependent_launch: ")
    assert chapters.gain_line("fused_attention", gpu=None).endswith("across one record")
