import copy
import json
from pathlib import Path

import pytest

from chatterbox_lab import registry
from chatterbox_lab.measure.bench import LADDER_RUNGS
from chatterbox_lab.records import report, results


@pytest.fixture
def doc():
    return results.load(results.committed()[-1][0])


def test_committed_gpu_results_are_valid_and_complete(doc):
    prov = doc["provenance"]
    assert prov["gpu"] and prov["driver"] and prov["cuda"] and prov["git_commit"]
    assert prov["preset"] == "full" and prov["tokens"] == 256
    base = doc["rungs"]["upstream_fp32"]
    for key in ("t3_decode_tok_s", "rtf", "peak_vram_mib", "gpu_kernels_per_token", "host_launches_per_token"):
        assert isinstance(base[key], (int, float)), key
    # `bench --ladder`: upstream, the guide's four rungs and the recommended set, then S3Gen's recommended steps.
    s3gen = set(registry.preset("recommended", "hopper", model="s3gen"))
    assert set(doc["rungs"]) == set(LADDER_RUNGS) | s3gen
    for figures in doc["rungs"].values():
        assert figures["peak_vram_mib"] > 0 and figures["compile_s"] is not None
        assert len(figures["raw"]["t3_decode_s"]) == prov["repeats"]


def test_ladder_targets_hold_in_the_committed_run(doc):
    compiled, base = doc["rungs"]["compiled"], doc["rungs"]["upstream_fp32"]
    assert compiled["t3_decode_tok_s"] >= 500
    # The product's default path, in a fresh process with the shipped picks, within the 10 minutes.
    assert doc["rungs"]["recommended"]["t3_decode_tok_s"] >= 1600
    assert doc["provenance"]["process_wall_s"] <= 600
    assert compiled["host_launches_per_token"] <= 6 and compiled["graph_launches_per_token"] == 1
    assert base["host_launches_per_token"] > 900
    assert 0 < compiled["fraction_of_floor"] < 1 and doc["roofline"]["copy_bandwidth_gb_s"] > 1000


def test_a_committed_gpu_run_recorded_the_equivalence_checks():
    checks = results.latest_gpu_checks()
    assert checks, "no committed GPU run with --checks"
    assert all(checks["fp32_token_identity"].values()) and checks["bf16_within_tolerance"]


def test_validation_names_what_is_missing(doc):
    broken = copy.deepcopy(doc)
    del broken["provenance"]["driver"]
    broken["rungs"]["bf16"]["rtf"] = "fast"
    with pytest.raises(ValueError, match=r"provenance.driver missing; rungs.bf16.rtf must be a number"):
        results.validate(broken)
    with pytest.raises(ValueError, match="rungs must be a non-empty mapping"):
        results.validate({**doc, "rungs": {}})


def test_write_never_overwrites_silently(doc, tmp_path):
    path = results.write(doc, tmp_path / "r.json")
    assert json.loads(path.read_text())["rungs"] == doc["rungs"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        results.write(doc, path)
    results.write(doc, path, overwrite=True)


def test_provenance_has_every_required_key():
    prov = results.provenance(device="cpu", preset="tiny", text="x", tokens=3)
    assert set(results.PROVENANCE_KEYS) <= set(prov)
    assert prov["command"].startswith("python")


@pytest.mark.parametrize("page", list(report.PAGES), ids=lambda page: page.name)
def test_generated_tables_match_the_committed_results(page):
    stale = f"{page.relative_to(report.ROOT)} is stale: run `python -m chatterbox_lab readme`"
    assert report.render_page(page) == page.read_text(), stale


def test_a_page_without_its_block_is_refused_by_name():
    with pytest.raises(ValueError, match=r"docs/steps.md has no <!-- steps:start -->"):
        report.render_page(report.DOCS / "steps.md", "no blocks here")


def test_notebook_catalog_matches_the_notebooks():
    listed = {n["file"] for n in report.notebook_catalog()}
    present = {p.name for p in (report.ROOT / "notebooks").glob("*.ipynb")}
    assert listed == present
    sources = {p.stem + ".ipynb" for p in (report.ROOT / "notebooks" / "src").glob("*.py")}
    assert sources == present
    assert all(n["runner"] in {"cpu", "gpu"} for n in report.notebook_catalog())


def test_every_number_in_readme_prose_is_a_definition_not_a_measurement():
    """Measured numbers reach the README only through the generated blocks."""
    import re

    text = report.README.read_text()
    prose = re.sub(r"<!-- (\w+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)  # names and commands, not figures
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link addresses, not figures
    numbers = set(re.findall(r"(?<![\w.])\d[\d,.]*\d|\b\d\b", prose))
    definitions = {
        "0.1.7",  # the upstream chatterbox-tts version
        "3.10",   # minimum Python
        "0.5",    # T3's size in billions of parameters
        "25",     # speech tokens per second of audio (S3_TOKEN_RATE)
        "50",     # the guide's assumed tokens per second of audio
        "256",    # the GPU benchmark's default token count
        "10",     # upstream's Euler steps of S3Gen's flow (flow_inference's default)
    }
    assert numbers <= definitions, f"numbers with no committed source: {sorted(numbers - definitions)}"
    from chatterbox.models.s3tokenizer import S3_TOKEN_RATE

    from chatterbox_lab.records.reference import GUIDE_TOKENS_PER_AUDIO_SECOND

    assert S3_TOKEN_RATE == 25 and GUIDE_TOKENS_PER_AUDIO_SECOND == 50


def test_latest_with_skips_later_runs_that_lack_the_rungs():
    wanted = {"compiled", "sampling_in_graph"}
    path, doc = results.latest_with("beyond", tuple(wanted), batch=True)
    assert wanted <= set(doc["rungs"]) and doc["batch"]["streams"]
    later = [d for _, d in results.committed(folder="beyond") if d["provenance"]["date_utc"] > doc["provenance"]["date_utc"]]
    assert later and all(not wanted <= set(d["rungs"]) or not d.get("batch") for d in later)
    with pytest.raises(LookupError, match="no committed GPU result"):
        results.latest_with("beyond", ("no_such_rung",))


def test_latest_with_traced_takes_the_run_whose_traces_are_committed():
    rungs = ("fused_bookkeeping", "staged_weights")
    path, doc = results.latest_with("beyond", rungs, traced=True)
    root = Path(__file__).resolve().parent.parent
    assert all((root / doc["rungs"][rung]["trace"]).is_file() for rung in rungs)
    newest = results.latest_with("beyond", rungs)[1]
    assert newest["provenance"]["date_utc"] >= doc["provenance"]["date_utc"]
    with pytest.raises(LookupError, match="with their traces"):
        results.latest_with("beyond", ("no_such_rung",), traced=True)


def test_committed_gpu_soak_served_everything_with_flat_memory():
    """Issue 7's GPU record: every request sent and served, no recompile, host memory flat after
    the first 50 requests (the CI soak's bound)."""
    from test_server import RSS_GROWTH_BOUND_MIB

    complete = [d for _, d in results.committed(folder="soak") if d["rungs"]["soak"].get("not_started") == 0]
    assert complete, "a GPU soak that sent every request is committed"
    soak = complete[-1]["rungs"]["soak"]
    assert soak["completed"] == soak["requests"]
    assert soak["errors"] == soak["recompiles"] == soak["bad_lengths"] == 0
    assert soak["rss_end_mib"] - soak["rss_every_50"][0][1] < RSS_GROWTH_BOUND_MIB
    assert f"{soak['completed']}/{soak['requests']} requests" in report.soak_section()


def test_cold_start_records_name_their_empty_caches():
    cold = results.cold_starts()
    assert {"captured_graph", "fused_sampling"} <= {rung for _, rung in cold}
    for (gpu, rung), (path, doc) in cold.items():
        command = doc["provenance"]["command"]
        assert doc["provenance"]["gpu"] == gpu
        assert "TORCHINDUCTOR_CACHE_DIR=" in command and "--no-sweep" in command, path.name
        assert doc["rungs"][rung]["compile_s"] > 0


def test_flop_table_and_many_line_read_the_record():
    doc = dict(roofline=dict(matmul_tflops=500.0),
               flops=dict(per_utterance=dict(t3=1e12, s3gen_flow=4e12), audio_s=10.24),
               end_to_end=dict(many=dict(utterances=8, audio_s=81.92, x_realtime=100.0, x_realtime_ceiling=1024.0,
                                         stages_s=dict(t3=0.5, s3gen_flow=0.3)),
                               many_fewer_flow_steps=dict(flow_steps=5, mel_rel_difference=0.1, x_realtime=120.0,
                                                          x_realtime_ceiling=1500.0)))
    table = report.flop_table(doc)
    assert "| t3 | 1,000 | 2.00 |" in table and "| all | 5,000 | 10.00 |" in table
    line = report.many_line("card", doc)
    assert "8 utterances (82 s of audio) at 100x" in line and "ceiling 1,500x" in line and "(500 TFLOP/s): 1,024x" in line


def test_stream_line_reads_the_wait_where_the_record_has_it():
    stream = dict(first_audio_s=0.0731, first_chunk_tokens=8, chunk_tokens=32)
    assert report.stream_line("card", dict(end_to_end=dict(stream=stream))) is None
    line = report.stream_line("card", dict(end_to_end=dict(stream=dict(stream, wait_s=0.0))))
    assert "first audio 73 ms" in line and "first chunk of 8 tokens, then 32" in line and "waits 0 ms" in line


def test_the_latest_flop_record_has_its_ceiling():
    path, doc = report.latest_flop_record()
    many = doc["end_to_end"]["many"]
    assert many["x_realtime"] < many["x_realtime_ceiling"] and doc["provenance"]["gpu"]


def test_comparison_table_puts_each_record_on_a_row():
    docs = {"old": {"rungs": {"a": {"t3_decode_tok_s": 1000.0}, "b": {"t3_decode_tok_s": 1100.0}}},
            "new": {"rungs": {"a": {"t3_decode_tok_s": 1200.0}}}}
    assert results.comparison_table(docs, ("a", "b")).splitlines() == [
        "| t3_decode_tok_s | a | b |", "|---|---|---|", "| old | 1,000 | 1,100 |", "| new | 1,200 | - |"]


def test_all_with_lists_every_record_of_the_rungs_oldest_first():
    found = results.all_with("beyond", ("draw_aside", "folded_prologue"))
    assert len(found) >= 3 and found[-1] == results.latest_with("beyond", ("draw_aside", "folded_prologue"))
    dates = [doc["provenance"]["date_utc"] for _, doc in found]
    assert dates == sorted(dates)
    with pytest.raises(LookupError, match="no_such_rung"):
        results.all_with("beyond", ("no_such_rung",))
