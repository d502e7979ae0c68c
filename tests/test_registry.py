"""The step registry, the decode plan it resolves into, and the kernel picks: the one list of steps
must stay consistent with the code and records it names."""
import json
from pathlib import Path

import pytest

from chatterbox_lab import registry
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.kernels import decode_attention, fused_matvec, fused_sampling, staged_matvec
from chatterbox_lab.kernels.decode_attention import AttentionConfig
from chatterbox_lab.kernels.experimental import persistent_layer
from chatterbox_lab.kernels.experimental.persistent_layer import LayerConfig
from chatterbox_lab.kernels.fused_matvec import KernelConfig
from chatterbox_lab.kernels.fused_sampling import SamplingConfig
from chatterbox_lab.kernels.picks import DEFAULT, KernelPicks, shipped_for
from chatterbox_lab.kernels.staged_matvec import StagedConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatterbox_lab"
RESULTS = ROOT / "data" / "results"


def _ladder(model):
    return registry.ladder(model)


@pytest.mark.parametrize("name", list(registry.STEPS))
def test_every_step_is_described_where_it_is_implemented(name):
    step = registry.STEPS[name]
    assert step.name == name and step.model in registry.MODELS
    assert step.status in registry.STATUSES and step.runs_on in registry.RUNS_ON
    assert step.summary.strip() and step.module.strip()
    assert (PACKAGE / step.module).is_file(), step.module


@pytest.mark.parametrize("name", list(registry.STEPS))
def test_every_step_needs_known_earlier_steps_of_its_own_model(name):
    step = registry.STEPS[name]
    ladder = _ladder(step.model)
    for other in step.needs + step.takes_over:
        assert other in ladder, (name, other)
    for need in step.needs:
        assert ladder.index(need) < ladder.index(name), (name, need)


@pytest.mark.parametrize("name", [n for n, s in registry.STEPS.items() if s.status == "experimental"])
def test_every_experimental_step_names_the_record_that_measured_it_slower(name):
    evidence = registry.STEPS[name].evidence
    assert (evidence and (RESULTS / evidence).is_file()) or (registry.STEPS[name].unmeasured and not evidence), name


def test_only_experimental_steps_name_evidence():
    assert all(step.evidence is None for step in registry.STEPS.values() if step.status != "experimental")


def test_the_ladders_hold_each_step_once_in_the_order_of_their_model():
    assert registry.T3_STEPS + registry.S3GEN_STEPS == tuple(registry.STEPS)
    assert {registry.STEPS[n].model for n in registry.T3_STEPS} == {"t3"}
    assert {registry.STEPS[n].model for n in registry.S3GEN_STEPS} == {"s3gen"}


def test_the_guide_preset_is_the_guides_four_steps():
    assert registry.GUIDE == ("bf16", "static_cache", "embed_cache", "compiled")
    assert registry.preset("guide") == registry.GUIDE
    assert registry.preset("guide", model="s3gen") == ()


@pytest.mark.parametrize("model", registry.MODELS)
def test_the_recommended_preset_on_hopper_has_no_experimental_step(model):
    chosen = registry.preset("recommended", "hopper", model)
    assert chosen and not [n for n in chosen if registry.STEPS[n].status == "experimental"]
    assert chosen == tuple(n for n in _ladder(model) if registry.STEPS[n].status != "experimental")


def test_the_recommended_preset_on_a_cpu_is_the_caches_and_no_s3gen_step():
    assert registry.preset("recommended", "cpu") == ("static_cache", "embed_cache")
    assert registry.preset("recommended", "cpu", "s3gen") == ()


@pytest.mark.parametrize("model", registry.MODELS)
@pytest.mark.parametrize("kind", registry.RUNS_ON)
@pytest.mark.parametrize("name", registry.PRESETS)
@pytest.mark.parametrize("compiles", [True, False])
def test_every_preset_passes_the_registrys_check(model, kind, name, compiles):
    chosen = registry.preset(name, kind, model, compiles=compiles)
    assert registry.check(chosen, model=model) == set(chosen)
    assert list(chosen) == [n for n in _ladder(model) if n in chosen]  # in ladder order
    assert all(registry.runs_on(n, kind) for n in chosen) or name == "guide"
    if not compiles:
        assert not [n for n in chosen if registry.STEPS[n].compiles]


def test_the_all_preset_runs_every_step_a_device_can():
    assert registry.preset("all", "hopper") == registry.T3_STEPS
    assert not {"dependent_launch", "launch_ahead", "staged_weights", "staged_head"} & set(registry.preset("all", "cuda"))


def test_unknown_presets_and_device_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        registry.preset("fastest")
    with pytest.raises(ValueError, match="unknown device kind 'tpu'"):
        registry.preset("recommended", "tpu")
    with pytest.raises(ValueError, match="unknown step 'fp8'"):
        registry.step("fp8")


def test_the_markdown_table_has_a_row_per_step():
    for model in registry.MODELS:
        rows = registry.markdown_table(model).splitlines()[2:]
        assert [row.split("`")[1] for row in rows] == list(_ladder(model))


def _plan(*steps, device="cpu"):
    return DecodePlan.resolve(registry.check(steps, model="t3"), device)


def test_fused_attention_takes_over_from_filled_cache_attention():
    compiled = ("static_cache", "embed_cache", "compiled")
    assert _plan(*compiled).attention == "sdpa"
    assert _plan(*compiled, "filled_cache_attention").attention == "filled_blocks"
    assert _plan(*compiled, "fused_attention").attention == "kernel"
    assert _plan(*compiled, "filled_cache_attention", "fused_attention").attention == "kernel"


def test_persistent_layers_take_over_from_the_head_handoff():
    kernels = ("static_cache", "fused_projections", "fused_matvec", "fused_attention")
    assert _plan(*kernels).layer == "separate"
    assert _plan(*kernels, "head_handoff").layer == "handoff"
    assert _plan(*kernels, "persistent_layers").layer == "persistent"
    assert _plan(*kernels, "head_handoff", "persistent_layers").layer == "persistent"


def test_a_gpus_launch_machinery_changes_nothing_on_a_cpu():
    plan = DecodePlan.resolve(registry.ladder_prefix("draw_aside"), "cpu")
    assert {"dependent_launch", "launch_ahead", "draw_aside"} <= plan.steps
    assert plan.launch == "plain" and not plan.pdl and plan.draw == "inline" and not plan.opens_early
    # What does not need that machinery still holds on a CPU.
    assert plan.staged == ("gate_up", "head") and plan.bookkeeping == "prologue" and plan.graph == "multi_step"


def test_a_plan_reads_each_step_into_its_field():
    upstream = DecodePlan.resolve(())
    assert (upstream.weights, upstream.cache, upstream.embedding, upstream.graph, upstream.projections,
            upstream.matmuls, upstream.staged, upstream.attention, upstream.layer, upstream.sampling,
            upstream.bookkeeping, upstream.launch, upstream.draw, upstream.prefill) == \
        ("fp32", "dynamic", "upstream", "none", "separate", "pytorch", (), "sdpa", "separate", "host", "pytorch",
         "plain", "inline", "eager")
    guide = _plan(*registry.GUIDE)
    assert (guide.weights, guide.cache, guide.embedding, guide.graph) == ("bf16", "static", "cached", "inductor")
    assert not guide.captured and _plan(*registry.ladder_prefix("captured_graph")).captured
    every = DecodePlan.resolve(registry.T3_STEPS)
    assert (every.sampling, every.bookkeeping, every.prefill, every.matmuls) == ("kernel", "folded", "graph", "matvec")


def test_a_plan_refuses_steps_without_what_they_need():
    with pytest.raises(ValueError, match="'persistent_layers' needs fused_matvec, fused_attention"):
        DecodePlan.resolve({"static_cache", "persistent_layers"})
    with pytest.raises(ValueError, match="unknown t3 steps"):
        DecodePlan.resolve({"flow_graphs"})


KNOB_CONFIGS = {"attention": AttentionConfig(2, 2, 256, 8), "qkv": KernelConfig(4, 1024, 2),
                "gate_up": StagedConfig(8, 256, 2, 4, 4), "sampling": SamplingConfig(16),
                "layer": LayerConfig(32 * 2**10, 8, 1)}


def _picks():
    picks = KernelPicks(source="a record", gpu="NVIDIA H100 80GB HBM3")
    for knob, config in KNOB_CONFIGS.items():
        picks = picks.with_pick(knob, config)
    return picks


def test_picks_round_trip_through_their_names_and_json():
    picks = _picks()
    assert picks.names() == {"attention": "s2_p2_b256_w8", "gate_up": "staged_n8_c256_l2_wn4_w4", "layer": "t32k_w8_p1",
                             "qkv": "n4_k1024_w2", "sampling": "sampling_w16"}
    assert KernelPicks.from_names(picks.names(), source="a record", gpu=picks.gpu) == picks
    assert KernelPicks.from_json(picks.to_json()) == picks
    assert dict(KernelPicks.from_json(picks.to_json()).calls) == KNOB_CONFIGS


def test_with_pick_leaves_the_picks_it_was_called_on_as_they_were():
    picks = _picks()
    names = picks.names()
    changed = picks.with_pick("qkv", KernelConfig(1, 512, 4))
    assert picks.names() == names and changed.names()["qkv"] == "n1_k512_w4"
    cleared = picks.with_pick("qkv", None)
    assert "qkv" not in cleared.names() and "qkv" in picks.names()
    assert (changed.source, changed.gpu) == (picks.source, picks.gpu)
    with pytest.raises(AttributeError):
        picks.rows = 4


def test_picks_answer_with_the_kernels_defaults_where_they_hold_none():
    n, k = 3072, 1024
    assert DEFAULT.matvec("qkv", 2, n, k) == fused_matvec.default_config(n, k)
    assert DEFAULT.staged("gate_up", 2, 4096, k, True) == staged_matvec.default_config(4096, k, True)
    assert DEFAULT.attention(448) == decode_attention.default_config(448)
    assert DEFAULT.sampling_warps(8194) == fused_sampling.default_warps(fused_sampling.blocks(8194)[0])
    assert DEFAULT.layer() == persistent_layer.DEFAULT_CONFIG
    picks = _picks()
    assert picks.matvec("qkv", 2, n, k) == KNOB_CONFIGS["qkv"] and picks.attention(448) == KNOB_CONFIGS["attention"]
    assert picks.staged("gate_up", 2, 4096, k, True) == KNOB_CONFIGS["gate_up"]
    assert picks.sampling_warps(8194) == 16 and picks.layer() == KNOB_CONFIGS["layer"]
    # Tuned for one CFG pair: other row counts run the defaults.
    assert picks.matvec("qkv", 4, n, k) == fused_matvec.default_config(n, k)


@pytest.mark.parametrize("knob, config", [("attention", KernelConfig(4, 1024, 2)),
                                          ("qkv", AttentionConfig(1, 1, 64, 4)),
                                          ("sampling", KernelConfig(4, 1024, 2)),
                                          ("layer", SamplingConfig(4))])
def test_a_config_of_the_wrong_kind_for_its_knob_is_refused(knob, config):
    with pytest.raises(ValueError, match=f"{knob} takes a"):
        KernelPicks().with_pick(knob, config)
    with pytest.raises(ValueError, match=f"{knob} takes a"):
        KernelPicks(calls=((knob, config),))


def test_an_unknown_knob_is_refused():
    with pytest.raises(ValueError, match="no knob"):
        KernelPicks().with_pick("lm_head", KernelConfig(4, 1024, 2))


def test_the_picks_shipped_for_a_tuned_card_and_the_defaults_elsewhere():
    h100 = shipped_for("NVIDIA H100 80GB HBM3")
    assert h100 != DEFAULT and h100.calls and h100.gpu == "NVIDIA H100 80GB HBM3"
    assert h100.source.startswith("data/results/") and (ROOT / h100.source).is_file()
    assert shipped_for("unknown card") == DEFAULT and shipped_for("unknown card").calls == ()
    assert shipped_for(None) == DEFAULT


def test_an_experimental_rung_is_labelled_in_the_record_and_its_table():
    from chatterbox_lab.measure.bench import EXPERIMENTAL_RUNGS, LADDER_RUNGS, rung_status
    from chatterbox_lab.records.results import markdown_table

    assert [rung_status(r) for r in LADDER_RUNGS] == ["upstream", "guide", "guide", "guide", "guide", "recommended"]
    assert {rung_status(r) for r in EXPERIMENTAL_RUNGS} == {"experimental"}
    doc = {"rungs": {"recommended": {"status": "recommended"}, "head_handoff": {"status": "experimental"}}}
    assert markdown_table(doc, ("t3_decode_tok_s",)).splitlines()[2:] == [
        "| recommended | - |", "| head_handoff (experimental) | - |"]


def test_ship_picks_writes_a_records_picks_as_the_package_ships_them(tmp_path, monkeypatch, capsys):
    from chatterbox_lab.__main__ import main
    from chatterbox_lab.kernels import picks

    shipped = picks.SHIPPED_DIR / "nvidia-h100-80gb-hbm3.json"
    record = json.loads(shipped.read_text())["source"]
    monkeypatch.setattr(picks, "SHIPPED_DIR", tmp_path)
    assert main(["ship-picks", record]) == 0
    assert (tmp_path / shipped.name).read_text() == shipped.read_text()
    with pytest.raises(SystemExit) as refused:
        main(["ship-picks", str(tmp_path / "missing.json")])
    assert refused.value.code == 2 and "missing.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in registry.T3_STEPS if registry.STEPS[n].takes_over])
def test_a_step_that_takes_over_leaves_the_other_nothing_to_change(name):
    from dataclasses import replace

    for other in registry.STEPS[name].takes_over:
        without = registry.requirements(name) | {name} | registry.requirements(other)
        with_other = DecodePlan.resolve(without | {other}, "cpu")
        assert replace(with_other, steps=frozenset()) == replace(DecodePlan.resolve(without, "cpu"), steps=frozenset())
