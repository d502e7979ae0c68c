"""Tables for the README and notebooks, generated from committed results (never typed)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from chatterbox_lab import registry
from chatterbox_lab.pipeline.synthesis import STAGES
from chatterbox_lab.records import results, spread

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CATALOG = ROOT / "notebooks" / "catalog.json"
BLOCKS = {"headline": lambda: headline_section(), "results": lambda: results_section(),
          "notebooks": lambda: notebook_section(), "soak": lambda: soak_section(), "e2e": lambda: end_to_end_section(),
          "steps": lambda: registry.markdown_table("t3"), "s3gen_steps": lambda: registry.markdown_table("s3gen")}
# Which generated blocks each page holds: the README's first screen, the reference pages in docs/.
PAGES = {README: ("headline", "notebooks"), DOCS / "steps.md": ("steps", "s3gen_steps"),
         DOCS / "records.md": ("results", "e2e"), DOCS / "serving.md": ("soak",)}
# The card of the headline: the one with the most committed records.
HEADLINE_GPU = "NVIDIA H100 80GB HBM3"
README_FIGURES = ("t3_decode_tok_s", "t3_speedup_vs_upstream", "fraction_of_floor", "t3_prefill_s", "e2e_s", "rtf",
                  "peak_vram_mib", "compile_s", "gpu_kernels_per_token", "host_launches_per_token")


def headline_rungs() -> tuple[tuple[str, str], ...]:
    """(rung, what it runs) of the headline: upstream, the guide's rungs, the recommended T3 steps,
    and those with S3Gen's recommended steps too (the bench's last S3Gen rung)."""
    t3 = registry.preset("recommended")
    s3gen = registry.preset("recommended", model="s3gen")
    return (("upstream_fp32", "upstream's own loop"),
            *((name, f"the guide: {registry.STEPS[name].summary}") for name in registry.GUIDE),
            ("recommended", f"the {len(t3)} recommended T3 steps"),
            (s3gen[-1], f"the recommended T3 steps and S3Gen's {len(s3gen)}"))


def headline_section(gpu: str = HEADLINE_GPU) -> str:
    """T3 decode rate, its ratio to upstream's, its share of the memory floor and the real-time factor
    of each headline rung: the median of the committed records that count for it, with their range."""
    rows = [spread_table(headline_rungs(), gpu)]
    return "\n".join([
        *rows, "",
        f"Measured on an **{gpu}**, preset `{spread.PRESET}`, {spread.TOKENS} speech tokens "
        f"({spread.TOKENS / 25:.2f} s of audio). Each cell is the median over the committed records, with "
        "the lowest and highest in brackets; each record is the median of its runs in one process. A guide "
        "rung counts every record of it; the recommended rungs count only records of today's step set "
        "([docs/records.md](docs/records.md)). RTF is wall time over audio time: below 1 is faster than "
        "real time."])


def spread_table(rungs, gpu: str = HEADLINE_GPU) -> str:
    """One row per rung (a name, or a (name, what it runs) pair): how many records count for it, and
    the median and range across them of its T3 rate, its ratio to upstream's, its share of the floor
    and its real-time factor."""
    rows = ["| rung | what runs | records | T3 tok/s | x upstream | of the floor | RTF |",
            "|---|---|---|---|---|---|---|"]
    for entry in rungs:
        rung, what = (entry, _what_runs(entry)) if isinstance(entry, str) else entry
        found = spread.records_of(rung, gpu)
        if not found:  # a step promoted or demoted since the last ladder run: `bench --ladder` measures it
            rows.append(f"| `{rung}` | {what} | 0 | not yet measured with these steps | - | - | - |")
            continue
        rate, rtf = (spread.of(doc["rungs"][rung][key] for _, doc in found) for key in ("t3_decode_tok_s", "rtf"))
        floor = spread.of(100 * doc["rungs"][rung]["fraction_of_floor"] for _, doc in found
                          if doc["rungs"][rung].get("fraction_of_floor"))
        speedup = "1x" if rung == spread.UPSTREAM else spread.speedup_spread(rung, gpu).text(suffix="x")
        rows.append(f"| `{rung}` | {what} | {len(found)} | {rate.text()} | {speedup} | "
                    f"{floor.text(digits=2, suffix='%')} | {rtf.text()} |")
    return "\n".join(rows)


def _what_runs(rung: str) -> str:
    if rung == spread.UPSTREAM:
        return "upstream's own loop"
    return registry.STEPS[rung].summary if rung in registry.STEPS else f"the {rung} steps"


def results_section() -> str:
    docs = results.committed(gpu_only=True)
    if not docs:
        return "No GPU results committed yet."
    path, doc = docs[-1]
    prov = doc["provenance"]
    rel = path.relative_to(ROOT)
    lines = [
        f"Latest GPU run: **{prov['gpu']}**, driver {prov['driver']}, CUDA {prov['cuda']}, torch {prov['torch']}, "
        f"transformers {prov['transformers']}, chatterbox-tts {prov['chatterbox_tts']}; "
        f"preset `{prov['preset']}`, {prov['tokens']} speech tokens ({prov['tokens'] / 25:.2f} s of audio), "
        f"median of {prov.get('repeats')} runs; commit `{str(prov['git_commit'])[:10]}`, {prov['date_utc']}. "
        f"Source: [`{rel}`]({rel}).",
        "",
        results.markdown_table(doc, README_FIGURES),
    ]
    if "roofline" in doc:
        lines += ["", f"Measured copy bandwidth {doc['roofline']['copy_bandwidth_gb_s']:,.0f} GB/s; "
                      f"`fraction_of_floor` is the decode rate over the rate at which the card could "
                      f"just read the step's weights and filled KV cache once."]
    if {"upstream_fp32", "compiled"} <= set(doc["rungs"]):
        from chatterbox_lab.records.reference import guide, side_by_side

        t3_row, e2e_row = side_by_side(doc)[:2]
        across = spread.speedup_spread("compiled", prov["gpu"])
        lines += ["", f"Compiled over upstream fp32 on the {prov['gpu']}: **{t3_row['ours_speedup']:.1f}x** T3 decode "
                      f"rate in this run, {across.text(suffix='x')} across {across.records} records; "
                      f"{e2e_row['ours_speedup']:.1f}x end to end in this run. The guide claims "
                      f"{guide()['headline_speedup']}x on an RTX 4090, measured end to end with a token "
                      f"count of audio seconds x 50, on another card and host; "
                      f"[`05_reproduce`](notebooks/05_reproduce.ipynb) puts both in the same units."]
    checked = [(p, d) for p, d in docs if d.get("checks")]
    if checked:
        check_path, checked_doc = checked[-1]
        checks = checked_doc["checks"]
        identity = checks.get("fp32_token_identity", {})
        where = "the same run" if check_path == path else f"`{check_path.name}`"
        lines += ["", f"Equivalence checks ({where}): fp32 tokens identical to upstream for "
                      f"{sum(identity.values())}/{len(identity)} step combinations "
                      f"({checks.get('fp32_tokens_checked')} tokens); bf16 teacher-forced logits "
                      f"relative error {checks.get('bf16_logit_rel_error', float('nan')):.2e} "
                      f"(tolerance {checks.get('bf16_logit_tolerance')})."]
    others = [p.name for p, _ in docs[:-1]]
    if others:
        lines += ["", "Earlier runs: " + ", ".join(f"`{n}`" for n in others) + "."]
    return "\n".join(lines)


def soak_section() -> str:
    """The latest GPU soak in which every request asked was sent (older records may be cut by
    their time limit, see data/results/soak/README.md)."""
    complete = [(p, d) for p, d in results.committed(gpu_only=True, folder="soak")
                if d["rungs"]["soak"].get("not_started") == 0]
    if not complete:
        return "No complete GPU soak committed yet."
    path, doc = complete[-1]
    prov, soak = doc["provenance"], doc["rungs"]["soak"]
    rel = path.relative_to(ROOT)
    after_burn_in = soak["rss_every_50"][0][1]
    lines = [f"GPU soak on an **{prov['gpu']}** (preset `{prov['preset']}`, commit `{prov['git_commit'][:7]}`, "
             f"[`{rel.name}`]({rel})), S3Gen steps: {', '.join(prov.get('s3gen_steps') or ['none'])}."]
    if lone := soak.get("lone_client"):
        lines.append(f"- One client, {lone['completed']} requests of {max(prov['tokens'])} tokens with a cached voice: "
                     f"latency p50 {lone['p50_s']:.2f} s.")
    lines += [f"- {soak['completed']}/{soak['requests']} requests from {soak['clients']} clients, texts and voices "
              f"mixed: {soak['requests_per_s']:.2f} requests/s, latency p50 {soak['p50_s']:.2f} s, "
              f"p99 {soak['p99_s']:.2f} s; {soak['errors']} errors, {soak['recompiles']} recompiles, "
              f"{soak['bad_lengths']} WAVs of the wrong length.",
              f"- Host RSS {after_burn_in:,.1f} MiB after 50 requests and {soak['rss_end_mib']:,.1f} MiB at the end; "
              f"GPU memory allocated {soak['gpu_allocated_start_mib']:,.0f} MiB after warm-up and "
              f"{soak['gpu_allocated_end_mib']:,.0f} MiB at the end.",
              f"- Start-up, from creating the session to the end of its warm-up: {soak['startup_s']:.1f} s."]
    if starts := soak.get("fresh_process_startup"):
        lines.append(f"- A fresh process, from launch to ready: {starts['cold']['ready_s']:.1f} s from empty compile "
                     f"caches, {starts['warm']['ready_s']:.1f} s with warm ones.")
    if one := soak.get("one_at_a_time"):
        lines.append(f"- The same requests without seeds, up to {soak['batch_requests']} decoded together: "
                     f"{soak['requests_per_s']:.2f} requests/s ({soak['x_realtime']:.0f}x real time), against "
                     f"{one['requests_per_s']:.2f} requests/s ({one['x_realtime']:.0f}x) one at a time; latency p50 "
                     f"{soak['p50_s']:.2f} s against {one['p50_s']:.2f} s.")
    return "\n".join(lines)


S3GEN_STAGES = ("s3gen_flow", "hifigan", "watermark")


def s3gen_warmup_s(rung: dict) -> float:
    """A rung's first (warm-up) synthesis's extra time in S3Gen's stages over its timed median:
    S3Gen's cold start, graph captures and compiles (flow, HiFi-GAN and watermark alike)."""
    first, median = rung["raw"]["warmup_stages_s"], rung["stages_s"]
    return max(0.0, sum(first[stage] - median[stage] for stage in S3GEN_STAGES))


# The end-to-end goals for one card, full preset: one 10-second utterance with a cached voice, and
# many utterances at once.
END_TO_END_GOALS = dict(rtf=0.03, first_audio_s=0.08, peak_vram_mib=2.0e9 / 2**20, x_realtime=2000)


def end_to_end_rows(rungs_doc: dict, e2e_doc: dict) -> list[dict]:
    """The end-to-end goals next to what was measured: the last S3Gen rung of `rungs_doc` and the
    stream and many-utterance figures of `e2e_doc`. The goals are for a voice already prepared:
    the real-time factor and peak memory of the rung's requests timed with the voice cached where
    the record has them (`cached_voice`), else its requests less their conditioning time."""
    last = list(rungs_doc["rungs"].values())[-1]
    cached_voice = last.get("cached_voice") or dict(
        rtf=(last["e2e_s"] - last["stages_s"]["conditioning"]) / last["audio_s"], peak_vram_mib=last["peak_vram_mib"])
    e2e = e2e_doc["end_to_end"]
    measured = dict(rtf=cached_voice["rtf"], first_audio_s=e2e["stream"]["first_audio_s"],
                    peak_vram_mib=cached_voice["peak_vram_mib"], x_realtime=e2e["many"]["x_realtime"])
    better_below = {"rtf", "first_audio_s", "peak_vram_mib"}
    return [dict(figure=k, goal=goal, measured=measured[k],
                 met=measured[k] <= goal if k in better_below else measured[k] >= goal)
            for k, goal in END_TO_END_GOALS.items()]


def _latest_end_to_end() -> tuple[tuple, dict]:
    """The latest e2e record with upstream and S3Gen rungs, and per card the latest record with
    S3Gen rungs, stream and many figures (the goals need all three)."""
    from chatterbox_lab.s3gen.s3gen_steps import S3GEN_STEPS

    rungs = results.latest_with("e2e", ("upstream_fp32", S3GEN_STEPS[0]))
    complete = {}
    for path, doc in results.committed(gpu_only=True, folder="e2e"):
        if {"stream", "many"} <= set(doc.get("end_to_end", {})) and S3GEN_STEPS[0] in doc["rungs"]:
            complete[doc["provenance"]["gpu"]] = (path, doc)
    return rungs, complete


def end_to_end_section() -> str:
    (rungs_path, rungs_doc), by_card = _latest_end_to_end()
    if not by_card:
        return "No end-to-end GPU run committed yet."
    prov = rungs_doc["provenance"]
    last = list(rungs_doc["rungs"].values())[-1]
    cols = ("e2e_s", "rtf") + tuple(f"{s}_s" for s in STAGES) + ("peak_vram_mib",)
    rows = [f"| rung | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    for name, r in rungs_doc["rungs"].items():
        values = [r["e2e_s"], r["rtf"], *(r["stages_s"].get(s) for s in STAGES), r["peak_vram_mib"]]
        rows.append(f"| {name} | " + " | ".join(results.fmt(v) for v in values) + " |")
    cards = list(by_card)
    goals = ["| figure | goal | " + " | ".join(f"{card} | met" for card in cards) + " |",
             "|---|---|" + "---|---|" * len(cards)]
    per_card = [end_to_end_rows(doc, doc) for _, doc in by_card.values()]
    for i, (figure, target) in enumerate(END_TO_END_GOALS.items()):
        goals.append(f"| {figure} | {results.fmt(target)} | " + " | ".join(
            f"{results.fmt(rows_[i]['measured'])} | {'yes' if rows_[i]['met'] else 'no'}" for rows_ in per_card) + " |")
    records = ", ".join(f"[`{path.name}`]({path.relative_to(ROOT)})" for path, _ in by_card.values())
    card_lines = [line for card, (_, doc) in by_card.items() for line in (stream_line(card, doc), many_line(card, doc))
                  if line]
    checks = rungs_doc["checks"]
    return "\n".join([
        f"End to end on an **{prov['gpu']}** (preset `{prov['preset']}`, {prov['tokens']} tokens = "
        f"{prov['tokens'] / 25:.2f} s of audio, median of {prov['repeats']}, commit `{prov['git_commit'][:7]}`, "
        f"[`{rungs_path.name}`]({rungs_path.relative_to(ROOT)})); the S3Gen rungs decode with "
        f"{', '.join(last['t3_steps'])}. Seconds per stage:",
        "", *rows, "",
        f"`flow_half`'s mel difference from the fp32 flow: {checks['half_flow_mel_rel_error']:.2%} "
        f"(tolerance {checks['half_flow_tolerance']:.0%}). The end-to-end goals on each card's latest complete "
        f"record ({records}), for a voice already prepared (`rtf` and `peak_vram_mib` of requests with the "
        "voice cached, `first_audio_s` from a streamed request, `x_realtime` of many utterances at once, below):",
        "", *goals, "", *card_lines])


def stream_line(card: str, doc: dict) -> str | None:
    """The streamed request of a record in a sentence, where the record measured how long playback
    would wait for later pieces (`wait_s`, from 2026-11-26)."""
    stream = doc["end_to_end"]["stream"]
    if "wait_s" not in stream:
        return None
    return (f"- {card}: streamed, the first audio {stream['first_audio_s'] * 1e3:.0f} ms after the request "
            f"(a first chunk of {stream['first_chunk_tokens']} tokens, then {stream['chunk_tokens']} at a time); "
            f"played from then on, it waits {stream['wait_s'] * 1e3:.0f} ms in all for later pieces.")


def many_line(card: str, doc: dict) -> str:
    """The many-utterance figures of a record in a sentence: the rate, where its time went, and
    the arithmetic ceiling and fewer flow steps where the record has them."""
    many = doc["end_to_end"]["many"]
    stages = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in many["stages_s"].items())
    line = (f"- {card}: {many['utterances']} utterances ({many['audio_s']:.0f} s of audio) at "
            f"{many['x_realtime']:.0f}x real time; seconds: {stages}.")
    if "x_realtime_ceiling" in many:
        line += (f" Ceiling from the FLOPs counted per utterance at this card's large-matmul rate "
                 f"({doc['roofline']['matmul_tflops']:.0f} TFLOP/s): {many['x_realtime_ceiling']:,.0f}x.")
    if "t3_cache_ceiling_x_realtime" in many:
        line += (f" T3 alone, reading its KV cache at the copy bandwidth and nothing else: "
                 f"{many['t3_cache_ceiling_x_realtime']:,.0f}x.")
    fewer = doc["end_to_end"].get("many_fewer_flow_steps")
    if fewer:
        line += (f" With {fewer['flow_steps']} flow steps instead of 10 (mels {fewer['mel_rel_difference']:.1%} "
                 f"from 10 steps'): {fewer['x_realtime']:.0f}x, ceiling {fewer['x_realtime_ceiling']:,.0f}x.")
    return line


def flop_table(doc: dict) -> str:
    """A record's FLOPs per utterance by stage (`flops.utterance_flops`) and the time each takes
    at the card's large-matmul rate: the arithmetic floor of one utterance in a batch."""
    rate = doc["roofline"]["matmul_tflops"] * 1e12
    counted = doc["flops"]["per_utterance"]
    rows = ["| stage | GFLOP per utterance | ms at the matmul rate |", "|---|---|---|"]
    rows += [f"| {stage} | {flops / 1e9:,.0f} | {flops / rate * 1e3:.2f} |" for stage, flops in counted.items()]
    total = sum(counted.values())
    rows.append(f"| all | {total / 1e9:,.0f} | {total / rate * 1e3:.2f} |")
    return "\n".join(rows)


def latest_flop_record() -> tuple[Path, dict]:
    """The latest GPU e2e record with FLOP counts and a many-utterance run."""
    found = [(p, d) for p, d in results.committed(gpu_only=True, folder="e2e")
             if "flops" in d and "many" in d.get("end_to_end", {})]
    if not found:
        raise LookupError("no committed e2e record with FLOP counts yet")
    return found[-1]


def plot_stages(stages_by_name: dict, ax=None, title: str = ""):
    """Horizontal bars of wall seconds per stage (conditioning, T3, flow, HiFi-GAN, watermark),
    one bar per entry of `stages_by_name` (name -> {stage: seconds})."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(stages_by_name)))
    names = list(stages_by_name)[::-1]
    left = [0.0] * len(names)
    for stage, colour in zip(STAGES, ("tab:gray", "tab:green", "tab:blue", "tab:orange", "tab:purple")):
        widths = [stages_by_name[n].get(stage, 0.0) for n in names]
        ax.barh(names, widths, left=left, color=colour, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds")
    # Outside the axes, on the right: inside, it covers the longest bars.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    ax.figure.tight_layout()
    return ax.figure


def notebook_catalog() -> list[dict]:
    return json.loads(CATALOG.read_text())["notebooks"]


def notebook_section() -> str:
    rows = ["| notebook | runner | CPU time | what it checks |", "|---|---|---|---|"]
    rows += [f"| [`{n['file']}`](notebooks/{n['file']}) | {n['runner']} | ~{n['cpu_minutes']} min | {n['checks']} |"
             for n in notebook_catalog()]
    return "\n".join(rows)


def render_page(path: Path, text: str | None = None) -> str:
    """`path`'s text (or `text`) with each of its generated blocks made anew."""
    text = path.read_text() if text is None else text
    for name in PAGES[path]:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path.relative_to(ROOT)} has no {start} ... {end} block")
        made = _links_from(path.parent, BLOCKS[name]())
        text = pattern.sub(lambda _: f"{start}\n{made}\n{end}", text)
    return text


def _links_from(folder: Path, markdown: str) -> str:
    """The blocks link files relative to the repository's root; a page in docs/ needs them relative
    to its own folder."""
    def relative(match: re.Match) -> str:
        return f"]({os.path.relpath(ROOT / match.group(1), folder)})"

    return re.sub(r"\]\((?!https?:|#)([^)]+)\)", relative, markdown)


def update_pages() -> list[Path]:
    """Rewrite the generated blocks of the README and docs/ pages; returns the pages that changed."""
    changed = []
    for path in PAGES:
        old = path.read_text()
        new = render_page(path, old)
        if new != old:
            path.write_text(new)
            changed.append(path)
    return changed


def plot_rungs(doc: dict, title: str | None = None):
    """T3 decode rate per rung against the bandwidth floor, and launches per token."""
    import matplotlib.pyplot as plt

    rungs = doc["rungs"]
    names = list(rungs)
    fig, (rate, counts) = plt.subplots(1, 2, figsize=(12, 3.6))
    rate.bar(names, [rungs[n]["t3_decode_tok_s"] for n in names], color="tab:green")
    floors = [rungs[n].get("floor_tok_s") for n in names]
    if all(floors):
        rate.plot(names, floors, "k_", markersize=40, markeredgewidth=2)
        for i, n in enumerate(names):
            rate.annotate(f"{rungs[n]['fraction_of_floor']:.0%}", (i, rungs[n]["t3_decode_tok_s"]),
                          ha="center", va="bottom", fontsize=8)
        # Named in the title, not a legend: a legend box would sit on some rung's bar.
        rate.set_title("black line: bandwidth floor; label: share of it reached", fontsize="medium")
    rate.set_ylabel("T3 decode tokens/s")
    _slanted_labels(rate)
    plot_counts(rungs, ax=counts)
    counts.set_title("per token")
    prov = doc["provenance"]
    fig.suptitle(title or f"{prov.get('gpu') or 'CPU'}, preset {prov['preset']}, {prov['tokens']} tokens")
    fig.tight_layout()
    return fig


def plot_batch(doc: dict):
    """Batched decoding: aggregate and per-utterance T3 rate, and time per step, against the
    number of utterances decoded together."""
    import matplotlib.pyplot as plt

    streams = doc["batch"]["streams"]
    n = [int(k) for k in streams]
    figures = list(streams.values())
    fig, (rate, step) = plt.subplots(1, 2, figsize=(11, 3.4))
    rate.plot(n, [f["aggregate_tok_s"] for f in figures], "o-", label="all utterances")
    rate.plot(n, [f["per_stream_tok_s"] for f in figures], "s--", label="each utterance")
    rate.set_xscale("log", base=2)
    rate.set_yscale("log")
    rate.set_xlabel("utterances decoded together")
    rate.set_ylabel("T3 decode tokens/s")
    rate.legend()
    step.plot(n, [f["ms_per_step"] for f in figures], "o-", color="tab:red")
    step.set_xscale("log", base=2)
    step.set_xlabel("utterances decoded together")
    step.set_ylabel("ms per decode step")
    step.set_ylim(bottom=0)
    fig.suptitle(f"{doc['provenance'].get('gpu') or 'CPU'}, steps: {', '.join(doc['batch']['steps'])}")
    fig.tight_layout()
    return fig


def write_companions(doc: dict, json_path: Path) -> list[Path]:
    """The run's Markdown table and PNG plot, next to its JSON."""
    json_path = Path(json_path)
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    lines = [summary_table(doc)]
    if "roofline" in doc:
        lines += ["", f"Copy bandwidth: {doc['roofline']['copy_bandwidth_gb_s']:,.0f} GB/s "
                      f"({doc['roofline']['method']})."]
    md.write_text("\n".join(lines) + "\n")
    fig = plot_rungs(doc)
    fig.savefig(png, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [md, png]


def summary_table(doc: dict) -> str:
    cols = ("t3_decode_tok_s", "fraction_of_floor", "t3_prefill_s", "e2e_s", "rtf", "peak_vram_mib",
            "compile_s", "s3gen_warmup_s", "gpu_kernels_per_token", "host_launches_per_token", "cpu_ops_per_token")
    prov = doc["provenance"]
    where = prov.get("gpu") or f"CPU ({prov.get('cpu')})"
    title = f"{where}, preset {prov['preset']}, {prov['tokens']} tokens, median of {prov.get('repeats')}"
    return title + "\n" + results.markdown_table(doc, cols)


def batch_table(doc: dict) -> str:
    cols = ("aggregate_tok_s", "per_stream_tok_s", "ms_per_step", "peak_vram_mib", "kv_cache_mib", "compile_s")
    batch = doc["batch"]
    head = "| utterances | " + " | ".join(cols) + " |"
    rows = [f"| {n} | " + " | ".join(results.fmt(r.get(c)) for c in cols) + " |" for n, r in batch["streams"].items()]
    return "\n".join([f"batched decode, steps: {', '.join(batch['steps'])}", head, "|---|" + "---|" * len(cols), *rows])


def plot_counts(rungs: dict, keys=("gpu_kernels_per_token", "host_launches_per_token"), ax=None):
    """Bar chart of per-token counts for each rung of a results document."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    names = list(rungs)
    x = np.arange(len(names))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [rungs[n].get(key) or 0 for n in names]
        ax.bar(x + i * width, values, width, label=key.replace("_", " "))
    ax.set_xticks(x + width * (len(keys) - 1) / 2, names)
    _slanted_labels(ax)
    ax.set_yscale("symlog")
    ax.set_ylim(bottom=0)
    # Outside the axes, on the right: inside, it covers the tallest bars.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _slanted_labels(ax):
    """Rung names slanted and anchored at their right end, so long neighbours do not collide."""
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
