import pytest
import torch

from chatterbox_lab import registry
from chatterbox_lab.measure.lab_bench import LabBench, StepPicker, measure

TEXT = "Measure me."


def test_measure_upstream_and_a_ladder_step_set(tiny_tts):
    upstream = measure(tiny_tts, "alto", TEXT, (), 8, repeats=1)
    weights = {name: t.clone() for name, t in tiny_tts.t3.state_dict().items()}
    # bf16 casts T3 in place; measure must hand the shared model back in fp32, bit for bit
    ladder = measure(tiny_tts, "alto", TEXT, ["embed_cache", "static_cache", "bf16"], 8, repeats=1)
    assert all(torch.equal(t, weights[name]) for name, t in tiny_tts.t3.state_dict().items())
    assert (upstream.label, ladder.label) == ("upstream", "bf16 + static_cache + embed_cache")
    for m in (upstream, ladder):
        f = m.figures
        assert f["tokens"] == 8 and f["t3_decode_tok_s"] > 0 and f["rtf"] > 0 and f["compile_s"] >= 0
        assert f["cpu_ops_per_token"] > 50
        assert f["gpu_kernels_per_token"] is None and f["peak_vram_mib"] is None  # on a CPU
        assert m.synthesis.sample_rate == 24_000 and len(m.synthesis.wav) == 8 * 24_000 // 25


def test_measure_writes_a_short_trace_of_any_configuration(tiny_tts, tmp_path):
    from chatterbox_lab.measure import profiling

    m = measure(tiny_tts, "alto", TEXT, ("static_cache", "embed_cache"), 4, repeats=1, trace_dir=tmp_path / "runs")
    path = profiling.Path(m.figures["trace"])
    assert path.parent == tmp_path / "runs" / "static_cache+embed_cache" and path.name.endswith(".pt.trace.json.gz")
    events = profiling.load_trace(path)["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)


@pytest.mark.parametrize("steps,tokens,voice,error,message", [
    (("compiled",), 8, "alto", ValueError, "'compiled' needs static_cache, embed_cache"),
    (("static_cache", "embed_cache", "sampling_in_graph"), 8, "alto", ValueError, "'sampling_in_graph' needs compiled"),
    (("fp8",), 8, "alto", ValueError, "unknown t3 steps"),
    ("bf16", 8, "alto", TypeError, r"collection of step names, e.g. \('bf16',\)"),
    ((), 0, "alto", ValueError, "max_new_tokens must be a positive integer"),
    ((), 8, "nobody", FileNotFoundError, "bundled voices: alto, tenor"),
])
def test_measure_refuses_bad_input_before_any_work(tiny_tts, steps, tokens, voice, error, message):
    with pytest.raises(error, match=message):
        measure(tiny_tts, voice, TEXT, steps, tokens)


def test_step_rules_follow_requirements_both_ways():
    assert registry.requirements("sampling_in_graph") == {"compiled", "static_cache", "embed_cache"}
    # Every step past the guide builds on the static cache; bf16 and the embedding cache do not.
    assert registry.dependents("static_cache") == set(registry.T3_STEPS) - {"bf16", "static_cache", "embed_cache"}
    picker = StepPicker("A")
    picker.boxes["sampling_in_graph"].value = True
    assert picker.steps == ("static_cache", "embed_cache", "compiled", "sampling_in_graph")
    picker.boxes["fused_projections"].value = True
    picker.boxes["embed_cache"].value = False
    assert picker.steps == ("static_cache", "fused_projections")
    with pytest.raises(ValueError, match="needs compiled"):
        StepPicker("B", ("static_cache", "embed_cache", "sampling_in_graph"))


@pytest.fixture
def lab(tiny_tts):
    lab = LabBench(tiny_tts, text=TEXT)
    lab.tokens.value, lab.repeats.value = 8, 1
    assert "cblab-lab-bench" in lab._dom_classes and set(lab.single.pickers["this run"].boxes) == set(registry.T3_STEPS)
    return lab


def _pick(picker, steps):
    for step, box in picker.boxes.items():
        box.value = step in steps


def test_run_fills_table_chart_and_audio_and_reports_progress(lab):
    panel = lab.single
    _pick(panel.pickers["this run"], ("static_cache",))
    said = []
    panel.status.observe(lambda change: said.append(change["new"]), names="value")
    panel.run_button.click()
    assert said == ["this run: warming up…", "this run: measuring, run 1 of 1…", "this run: profiling…", "done"]
    assert "static_cache" in panel.table.value and "T3 decode tokens/s" in panel.table.value
    assert "speed-up" not in panel.table.value
    assert "image/png" in panel.chart.outputs[0]["data"]
    assert "<audio" in panel.audio.outputs[0]["data"]["text/html"]

    lab.text.value = " "
    panel.run_button.click()
    assert panel.status.value.startswith("<span") and "ValueError: text is empty" in panel.status.value
    assert "static_cache" in panel.table.value and not panel.run_button.disabled


def test_compare_shows_both_configurations_and_the_speed_up(lab):
    panel = lab.compare
    _pick(panel.pickers["A"], ())
    _pick(panel.pickers["B"], ("static_cache", "embed_cache"))
    panel.run_button.click()
    assert panel.status.value == "done"
    table = panel.table.value
    assert "<th>A<br><small>upstream</small></th>" in table
    assert "<th>B<br><small>static_cache + embed_cache</small></th>" in table
    assert "trace (open at ui.perfetto.dev)</th><td>-</td><td>-</td>" in table  # none asked for
    assert "T3 speed-up over A</th><td>1.00x</td>" in table
    players = [o for o in panel.audio.outputs if "<audio" in o["data"].get("text/html", "")]
    assert len(players) == 2
