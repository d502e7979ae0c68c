import json

import pytest
import torch

from chatterbox_lab.measure import profiling
from chatterbox_lab.records import results
from chatterbox_lab.__main__ import main
from chatterbox_lab.measure.bench import RUNGS, BenchConfig, run
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.s3gen.s3gen_steps import S3GEN_STEPS


def test_cli_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["bench", "--tokens", "8", "--repeats", "1", "--rungs", "upstream_fp32", "static_cache",
                 "--out", str(out), "--device", "cpu", "--trace-dir", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out
    assert "| upstream_fp32 |" in printed and f"wrote {out}" in printed
    doc = json.loads(out.read_text())
    assert list(doc["rungs"]) == ["upstream_fp32", "static_cache"]
    assert doc["rungs"]["static_cache"]["t3_steps"] == ["bf16", "static_cache"]
    rung = doc["rungs"]["upstream_fp32"]
    assert rung["t3_steps"] == []
    assert rung["tokens"] == 8 and rung["t3_decode_tok_s"] > 0 and rung["cpu_ops_per_token"] > 50
    assert rung["audio_s"] == pytest.approx(8 / 25)
    trace = profiling.load_trace(rung["trace"])
    assert trace["traceEvents"]


@pytest.mark.parametrize("args,message", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--tokens", "0"], "tokens must be >= 1"),
])
def test_cli_rejects_bad_options(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert message in capsys.readouterr().err


def test_bench_medians_and_stage_split(tiny_tts):
    # (a rung with bf16 would cast the shared fixture model in place)
    doc = run(BenchConfig(rungs=("upstream_fp32",), tokens=8, repeats=3, profile=False, device="cpu"),
              progress=False, tts=tiny_tts)
    rung = doc["rungs"]["upstream_fp32"]
    assert set(rung["stages_s"]) == {"conditioning", "t3", "s3gen_flow", "hifigan", "watermark"}
    assert len(rung["raw"]["t3_decode_s"]) == 3 and rung["raw"]["t3_steps"] == [8, 8, 8]
    per_run = sorted(sum(stages.values()) for stages in rung["raw"]["stages_s"])
    assert rung["e2e_s"] == pytest.approx(per_run[1])  # the median run's own total


def test_every_rung_is_timed_before_any_is_profiled_and_upstream_profiled_in_fp32(monkeypatch):
    """A profiler session leaves the process's later decodes slower, so no timing follows one; and
    upstream's loop is profiled in fp32 although the bf16 rung cast T3 in place before it."""
    from chatterbox_lab.measure import bench
    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(preset="tiny", device="cpu")  # its own: the bf16 rung casts it
    events = []
    synthesize, profile_steps = bench.synthesize, bench.profile_steps

    def timed(*args, **kwargs):
        events.append("timed")
        return synthesize(*args, **kwargs)

    def profiled(tts, steps, *args, **kwargs):
        events.append(("profiled", tuple(steps), tts.t3.speech_head.weight.dtype))
        return profile_steps(tts, steps, *args, **kwargs)

    monkeypatch.setattr(bench, "synthesize", timed)
    monkeypatch.setattr(bench, "profile_steps", profiled)
    doc = run(BenchConfig(rungs=("upstream_fp32", "bf16"), tokens=8, repeats=1, device="cpu"), progress=False,
              tts=tts)
    assert set(events[:-2]) == {"timed"}
    assert events[-2:] == [("profiled", (), torch.float32), ("profiled", ("bf16",), torch.float32)]
    assert tts.t3.speech_head.weight.dtype == torch.bfloat16  # the bf16 profile's decoder cast it again
    assert all(rung["cpu_ops_per_token"] > 0 for rung in doc["rungs"].values())


def test_profiler_counts_per_token(tiny_tts):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"))
    tokens = text_tokens_for(tiny_tts, "Count me.")
    counts = profiling.per_token_counts(lambda n: decoder.generate(tiny_tts.conds.t3, tokens, n))
    assert counts["cpu_ops"] > 50
    with pytest.raises(ValueError, match="long must exceed short"):
        profiling.per_token_counts(lambda n: None, short=8, long=8)


# The rungs of the latest committed GPU run: a step newer than it has no trace yet.
MEASURED_RUNGS = [r for r in RUNGS if r in results.latest_with("beyond", ("compiled",), batch=True)[1]["rungs"]]


@pytest.mark.parametrize("rung", MEASURED_RUNGS)
def test_committed_trace_of_every_rung_opens_as_a_chrome_trace_with_gpu_kernels(rung):
    """What Perfetto needs: a traceEvents list of complete events with name, phase, time and
    duration; and what the notebooks need: GPU kernels, with matmuls among them."""
    root = profiling.Path(__file__).resolve().parent.parent / "data" / "traces"
    found = sorted(root.glob(f"*/{rung}.pt.trace.json.gz"))  # one folder per card
    assert found, f"no committed trace of {rung} under {root}"
    path = found[0]
    assert path.stat().st_size < 4 * 2**20, "committed traces stay small: profile fewer tokens"
    trace = profiling.load_trace(path)
    events = trace["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X"]
    assert complete and all({"name", "ts", "dur", "pid", "tid"} <= e.keys() for e in complete)
    kernels = profiling.kernel_spans(trace)
    assert len(kernels) > 100
    mix = profiling.kernel_mix(trace)
    assert mix["matmul"] > 0 and sum(mix.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("rung, gate_up", [("fused_bookkeeping", "_matvec_kernel"), ("staged_weights", "_staged_kernel")])
def test_layer_links_read_a_layer_of_the_committed_traces(rung, gate_up):
    path = profiling.Path(__file__).resolve().parent.parent / "data" / "traces" / "h100" / f"{rung}.pt.trace.json.gz"
    rows = profiling.layer_links(profiling.load_trace(path))
    assert [profiling.kernel_kind(r["kernel"]) for r in rows] == ["matmul", "attention", "matmul", "matmul", "matmul"]
    assert rows[3]["kernel"] == gate_up and rows[0]["start_us"] == 0
    assert all(r["link_us"] > 0 and r["end_us"] > r["start_us"] and r["programs"] >= 32 for r in rows)


def test_step_seam_finds_the_generators_writes_only_between_one_graph_a_step():
    traces = profiling.Path(__file__).resolve().parent.parent / "data" / "traces" / "h100"
    seams = {rung: profiling.step_seam(profiling.load_trace(traces / f"{rung}.pt.trace.json.gz"))
             for rung in ("staged_weights", "multi_step_graph")}
    # A replay a step: PyTorch's two fills of the generator's seed and offset, then the draw.
    assert seams["staged_weights"]["kernels_between"] == ["vectorized_elementwise_kernel"] * 2 + \
        ["distribution_elementwise_grid_stride_kernel"]
    assert seams["multi_step_graph"]["kernels_between"] == ["distribution_elementwise_grid_stride_kernel"]
    assert seams["multi_step_graph"]["seam_us"] < seams["staged_weights"]["seam_us"]
    assert seams["multi_step_graph"]["next_kernel"] == "_prologue_kernel"
    folded = profiling.step_seam(profiling.load_trace(traces / "folded_prologue.pt.trace.json.gz"))
    assert folded["next_kernel"] == "_matvec_kernel" and folded["kernels_between"] == []
    aside = profiling.step_seam(profiling.load_trace(traces / "draw_aside.pt.trace.json.gz"))
    assert folded["to_layers_us"] < aside["to_layers_us"]
    assert profiling.short_name("void at::native::(anonymous namespace)::fill<float>(int)") == "fill"
    with pytest.raises(ValueError, match="no sampling kernel"):
        profiling.step_seam({"traceEvents": []})


def test_kernel_mix_sorts_kernels_by_kind():
    def kernel(name, ts):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": 1}
    names = ["nvjet_sm90_tst_64x8", "_matvec_kernel", "cudnn_sdpa_flash_fprop", "_decode_attention_kernel",
             "cub::detail::radix_sort::DeviceRadixSortOnesweepKernel", "_sample_kernel", "triton_per_fused_add_mean",
             "triton_poi_fused_copy", "void at::native::fill", "void at::native::reduce_kernel"]
    trace = {"traceEvents": [kernel(name, 2 * i) for i, name in enumerate(names)]}
    assert profiling.kernel_mix(trace, (0, 20)) == {"matmul": 0.2, "attention": 0.2, "sampling": 0.2,
                                                    "generated (Triton)": 0.2, "other kernels": 0.2}


def test_batched_decode_is_measured_per_batch_size(tiny_tts, tmp_path):
    # embed_cache's prefix includes bf16, which would cast the shared fixture model in place
    import copy

    tts = copy.copy(tiny_tts)
    tts.t3 = copy.deepcopy(tiny_tts.t3)
    partial = tmp_path / "partial.json"
    doc = run(BenchConfig(rungs=("embed_cache",), tokens=8, repeats=1, profile=False, device="cpu",
                          batch_sizes=(1, 3)), progress=False, tts=tts, partial=partial)
    streams = doc["batch"]["streams"]
    assert list(streams) == ["1", "3"] and doc["batch"]["steps"] == ["bf16", "embed_cache", "static_cache"]
    assert streams["3"]["raw"]["steps"] == [8]
    assert streams["3"]["aggregate_tok_s"] == pytest.approx(3 * streams["3"]["per_stream_tok_s"])
    assert json.loads(partial.read_text())["batch"]["streams"].keys() == streams.keys()


def test_end_to_end_stream_and_many_are_measured_with_the_last_rung(tiny_tts):
    import copy

    tts = copy.copy(tiny_tts)
    tts.t3 = copy.deepcopy(tiny_tts.t3)  # embed_cache's prefix casts T3 to bf16 in place
    doc = run(BenchConfig(rungs=("embed_cache",), tokens=32, repeats=1, profile=False, device="cpu",
                          stream=True, stream_chunk_tokens=16, many=3, many_flow_steps=2), progress=False, tts=tts)
    stream, many = doc["end_to_end"]["stream"], doc["end_to_end"]["many"]
    pieces = len(stream["raw"]["ready_s"][0])
    assert 0 < stream["first_audio_s"] < stream["e2e_s"] and pieces >= 2
    assert len(stream["raw"]["waits_s"][0]) == pieces - 1 and stream["wait_s"] >= 0
    assert stream["steps"] == ["bf16", "embed_cache", "static_cache"] and stream["seam_error"] >= 0
    assert many["utterances"] == 3 and many["x_realtime"] > 0
    assert many["audio_s"] == pytest.approx(3 * 32 / 25)
    # The arithmetic ceiling, from FLOPs counted before any step and the matmul rate.
    counted = doc["flops"]["per_utterance"]
    assert set(counted) == {"t3", "s3gen_flow", "hifigan", "watermark"} and min(counted.values()) > 0
    assert doc["flops"]["audio_s"] == pytest.approx(32 / 25) and doc["roofline"]["matmul_tflops"] > 0
    fewer = doc["end_to_end"]["many_fewer_flow_steps"]
    assert fewer["flow_steps"] == 2 and fewer["mel_rel_difference"] > 0 and "flow_steps" not in many
    assert 0 < doc["flops"]["s3gen_flow_with_many_flow_steps"] < counted["s3gen_flow"]
    assert fewer["x_realtime_ceiling"] > many["x_realtime_ceiling"] > 0
    assert many["t3_cache_ceiling_x_realtime"] == fewer["t3_cache_ceiling_x_realtime"] > 0


def test_batching_needs_a_cached_rung():
    with pytest.raises(ValueError, match="batching needs a last rung at or past embed_cache"):
        BenchConfig(rungs=("upstream_fp32", "static_cache"), batch_sizes=(8,), device="cpu").resolved()
    with pytest.raises(ValueError, match="batching needs a last rung at or past embed_cache"):
        BenchConfig(rungs=("static_cache",), many=4, device="cpu").resolved()
    with pytest.raises(ValueError, match="streaming needs a decoder rung"):
        BenchConfig(rungs=("upstream_fp32",), stream=True, device="cpu").resolved()
    with pytest.raises(ValueError, match="--many-flow-steps compares against --many N"):
        BenchConfig(rungs=("embed_cache",), many_flow_steps=4, device="cpu").resolved()
    with pytest.raises(ValueError, match="flow_steps must be a whole number"):
        BenchConfig(rungs=("embed_cache",), many=2, many_flow_steps=0, device="cpu").resolved()


def test_tuning_starts_only_from_a_tuned_record_of_the_same_card(tmp_path, capsys):
    record = results.load(results.latest_with("beyond", ("folded_prologue",), section="chain_sweep")[0])
    gpu = record["provenance"]["gpu"]
    path = tmp_path / "record.json"
    results.write(record, path)
    with pytest.raises(ValueError, match=f"tuned on {gpu}, this is a CPU"):
        BenchConfig(rungs=("captured_graph",), device="cpu", tune_from=str(path)).resolved()
    # A record of this machine's card (none: a CPU) sets the picks of every rung, whatever its steps.
    this_card = tmp_path / "this_card.json"
    results.write({**record, "provenance": {**record["provenance"], "gpu": None}}, this_card)
    picks = BenchConfig(rungs=("embed_cache",), device="cpu", tune_from=str(this_card)).resolved().picks
    assert picks.names() == {name: call["best"] for name, call in record["chain_sweep"]["calls"].items()}
    untuned = tmp_path / "untuned.json"
    results.write({**record, "chain_sweep": {}}, untuned)
    with pytest.raises(ValueError, match="the record has no chain tuning"):
        BenchConfig(rungs=("captured_graph",), device="cpu", tune_from=str(untuned)).resolved()
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--rungs", "captured_graph", "--tune-from", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err


def test_cli_bench_tunes_only_when_asked_and_runs_the_ladder_or_the_experimental_rungs(monkeypatch, capsys):
    import chatterbox_lab.__main__ as cli
    from chatterbox_lab.measure.bench import EXPERIMENTAL_RUNGS, LADDER_RUNGS

    class Started(Exception):
        pass

    configs = []

    def started(config, partial=None):
        configs.append(config)
        raise Started

    monkeypatch.setattr(cli, "run", started)
    for args in (["--rungs", "static_cache"], ["--ladder", "--tune"], ["--experimental"]):
        with pytest.raises(Started):
            main(["bench", "--device", "cpu", *args])
    plain, ladder, experimental = configs
    assert not plain.tune and plain.rungs == ("static_cache",)
    assert ladder.tune and ladder.rungs == LADDER_RUNGS == ("upstream_fp32", "bf16", "static_cache", "embed_cache",
                                                             "compiled", "recommended")
    assert not experimental.tune and experimental.rungs == EXPERIMENTAL_RUNGS
    assert set(EXPERIMENTAL_RUNGS) == {"filled_cache_attention", "head_handoff", "persistent_layers", "int8_weights",
                                       "fp8_weights", "int8_kv_cache"}
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--no-sweep"])
    assert "unrecognized arguments: --no-sweep" in capsys.readouterr().err


def test_rungs_name_the_ladder_prefix_the_recommended_set_or_it_with_one_experimental_step():
    from chatterbox_lab import registry
    from chatterbox_lab.measure.bench import EXPERIMENTAL_RUNGS, rung_steps

    assert RUNGS[0] == "upstream_fp32" and RUNGS[-1] == "recommended" and rung_steps("upstream_fp32", "cpu") == set()
    assert rung_steps("recommended", "cpu") == set(registry.preset("recommended", "cpu"))
    assert rung_steps("compiled", "cpu") == set(registry.GUIDE)
    assert rung_steps("fused_matvec", "cpu") == registry.ladder_prefix("fused_matvec")  # no experimental step before it
    assert "filled_cache_attention" not in rung_steps("fused_attention", "cpu")
    for rung in (r for r in EXPERIMENTAL_RUNGS if registry.runs_on(r, "cpu")):  # fp8 weights need a Hopper
        steps = rung_steps(rung, "cpu")
        assert steps == set(registry.preset("recommended", "cpu")) | {rung} | registry.requirements(rung)
        assert [s for s in steps if registry.STEPS[s].status == "experimental"] == [rung]


def test_s3gen_rungs_follow_the_t3_rungs_with_the_half_flow_check(tmp_path, capsys):
    """S3Gen's steps change the model in place, so this loads its own (the CLI does)."""
    out = tmp_path / "s3gen.json"
    assert main(["bench", "--tokens", "8", "--repeats", "1", "--rungs", "static_cache", "--s3gen",
                 "--no-profile", "--out", str(out), "--device", "cpu"]) == 0
    assert "| encoder_graphs |" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert list(doc["rungs"]) == ["static_cache", *S3GEN_STEPS]
    last = doc["rungs"][S3GEN_STEPS[-1]]
    assert last["t3_steps"] == ["bf16", "static_cache"]
    assert last["s3gen_steps"] == sorted(S3GEN_STEPS)
    assert last["rtf"] > 0 and last["s3gen_warmup_s"] >= 0
    assert doc["checks"]["half_flow_within_tolerance"] and doc["checks"]["half_flow_mel_rel_error"] > 0
