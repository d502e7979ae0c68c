"""What the chapters past the guide read from the committed records: which steps each teaches, the
one record its summary plot comes from, and each step's gain with its spread across records
(`records.spread`).

A chapter teaches a group of T3 steps. `CHAPTERS` names the group; the steps themselves, their
status and summary come from the registry, and a test checks that every step past the guide
belongs to exactly one chapter. The appendix of steps measured slower is not a typed list: it is
every `experimental` step whose registry record names the record (`evidence`) that measured it.

One record per summary plot: rates from different processes differ by more than some steps gain
(upstream's rate spans a factor of two across H100 records), so a plot never mixes records.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from chatterbox_lab import registry
from chatterbox_lab.records import results, spread

CARD = "NVIDIA H100 80GB HBM3"
# Where the records of single-stream rungs live: the ladder runs, the runs past the guide and the
# end-to-end runs (the prefill graph's). `beyond/ab/` holds two processes of an A/B, not one.
FOLDERS = ("", "beyond", "e2e")

# The chapter (its notebook's name) that teaches each step past the guide.
CHAPTERS = {
    "06a_fused_kernels": ("fused_projections", "fused_matvec", "fused_attention", "fused_sampling",
                          "fused_bookkeeping"),
    "06b_owning_the_graph": ("sampling_in_graph", "captured_graph", "dependent_launch", "launch_ahead",
                             "multi_step_graph", "draw_aside", "folded_prologue", "prefill_graph"),
    "06c_weights_on_chip_and_tuning": ("staged_weights", "staged_head"),
    "06d_many_utterances": (),
    # Experimental steps with a record that measured them slower (others are not yet timed on a GPU).
    "06e_measured_slower": tuple(name for name in registry.T3_STEPS
                                 if registry.STEPS[name].status == "experimental" and registry.STEPS[name].evidence),
}


def chapter_steps(chapter: str) -> tuple:
    """The steps `chapter` teaches, in ladder order."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}: choose from {', '.join(CHAPTERS)}")
    return tuple(name for name in registry.T3_STEPS if name in CHAPTERS[chapter])


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple:
    # Committed files do not change while a notebook runs; reading them all takes seconds.
    found = [pd for folder in FOLDERS for pd in results.committed(gpu_only=True, folder=folder)]
    return tuple(sorted(found, key=lambda pd: pd[1]["provenance"]["date_utc"]))


def _records(gpu: str | None) -> list[tuple[Path, dict]]:
    """Every committed record of `gpu` (of any card, with None), oldest first."""
    return [(path, doc) for path, doc in _all_records() if gpu is None or doc["provenance"]["gpu"] == gpu]


def record_name(path: Path) -> str:
    """A record's path under data/results/, as the registry's `evidence` and the READMEs name it."""
    return Path(path).resolve().relative_to(results.RESULTS_DIR).as_posix()


def chapter_record(rungs, gpu: str = CARD) -> tuple[Path, dict]:
    """The one record a chapter's summary plot reads: the newest record of `gpu` holding every rung
    of `rungs` (a ladder run with `--experimental` holds them all); where none does, the newest
    record of any card holding the most of them. Each record is one process on one card."""
    rungs = tuple(rungs)
    if not rungs:
        raise ValueError("chapter_record needs at least one rung")
    complete = [(path, doc) for path, doc in _records(gpu) if all(rung in doc["rungs"] for rung in rungs)]
    if complete:
        return complete[-1]
    candidates = [(sum(rung in doc["rungs"] for rung in rungs), index, path, doc)
                  for index, (path, doc) in enumerate(_records(None))]
    if not candidates or max(c[0] for c in candidates) == 0:
        raise LookupError(f"no committed record holds any of the rungs {list(rungs)}")
    _, _, path, doc = max(candidates, key=lambda c: (c[0], c[1]))
    return path, doc


def rungs_doc(doc: dict, rungs) -> dict:
    """`doc` with only those of `rungs` it holds, in its own order: what a chapter's plot shows."""
    return {**doc, "rungs": {name: figures for name, figures in doc["rungs"].items() if name in rungs}}


def plot_chapter(rungs, gpu: str = CARD, context=("compiled",)):
    """The chapter's summary plot: decode rate against the bandwidth floor, and kernels and host
    launches per token, for `rungs` as one record measured them (`chapter_record`), with the
    `context` rungs of the same process (the guide's last, by default) where the record holds them."""
    from chatterbox_lab.records import report

    path, doc = chapter_record(rungs, gpu)
    shown = rungs_doc(doc, (*context, *rungs))
    return report.plot_rungs(shown, title=f"{doc['provenance']['gpu']}, one process: {record_name(path)}")


def speedup(rung: str, over: str, figure: str = "t3_decode_tok_s", gpu: str | None = CARD) -> spread.Spread:
    """`rung`'s `figure` over `over`'s in every record of `gpu` (any card, with None) holding both
    (each ratio from one process), with its spread across those records."""
    ratios = []
    for _, doc in _records(gpu):
        a, b = doc["rungs"].get(rung, {}).get(figure), doc["rungs"].get(over, {}).get(figure)
        if a and b:
            ratios.append(a / b)
    if not ratios:
        raise LookupError(f"no committed record{f' of {gpu}' if gpu else ''} holds {figure} for both {rung!r} "
                          f"and {over!r}")
    return spread.of(ratios)


@dataclass(frozen=True)
class SlowerStep:
    """An experimental step as its evidence record measured it, next to the rung before it there."""

    step: str
    summary: str
    record: str
    rate: float
    baseline: str
    baseline_rate: float
    kernels_per_token: float | None
    baseline_kernels_per_token: float | None

    @property
    def ratio(self) -> float:
        return self.rate / self.baseline_rate


def slower_steps() -> list[SlowerStep]:
    """Every experimental step of the registry, read from the record its `evidence` names: its
    decode rate and the rate of the last recommended rung before it in the same process."""
    found = []
    for name in chapter_steps("06e_measured_slower"):
        step = registry.STEPS[name]
        doc = results.load(results.RESULTS_DIR / step.evidence)
        order = list(doc["rungs"])
        before = [r for r in order[: order.index(name)] if r != "upstream_fp32"
                  and registry.STEPS.get(r) and registry.STEPS[r].status != "experimental"]
        if not before:
            raise ValueError(f"{step.evidence} holds no recommended rung before {name!r} to compare with")
        base = before[-1]
        found.append(SlowerStep(name, step.summary, step.evidence, doc["rungs"][name]["t3_decode_tok_s"], base,
                                doc["rungs"][base]["t3_decode_tok_s"],
                                doc["rungs"][name].get("gpu_kernels_per_token"),
                                doc["rungs"][base].get("gpu_kernels_per_token")))
    return found


def slower_table(steps: list[SlowerStep]) -> str:
    rows = ["| step | what it changes | record | its rate (tok/s) | rung before it | that rung (tok/s) | ratio "
            "| kernels per token |", "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        kernels = (f"{s.kernels_per_token:.0f} against {s.baseline_kernels_per_token:.0f}"
                   if s.kernels_per_token and s.baseline_kernels_per_token else "-")
        rows.append(f"| `{s.step}` | {s.summary} | `{s.record}` | {s.rate:,.0f} | `{s.baseline}` | "
                    f"{s.baseline_rate:,.0f} | {s.ratio:.2f}x | {kernels} |")
    return "\n".join(rows)


def rung_before(step: str) -> str:
    """The rung that differs from `step`'s by that step alone: the recommended or guide step before
    it in ladder order (a rung is its step and every such step before it)."""
    ladder = [name for name in registry.T3_STEPS if registry.STEPS[name].status != "experimental"]
    if registry.STEPS[step].status == "experimental":
        raise ValueError(f"{step!r} is experimental: its rung is the recommended set with it added")
    index = ladder.index(step)
    if index == 0:
        raise ValueError(f"{step!r} is the first step: compare it with upstream_fp32")
    return ladder[index - 1]


def step_gain(step: str, gpu: str | None = CARD) -> spread.Spread:
    """What `step` gains over `rung_before(step)` measured in the same process, in every record of
    `gpu` (any card, with None) that holds both, with its spread across those records."""
    return speedup(step, rung_before(step), gpu=gpu)


def gains_table(steps, gpu: str | None = CARD) -> str:
    """One row per step: its summary (from the registry) and its gain over the rung before it in
    the same process, median and spread across the records of `gpu` that measured it."""
    rows = ["| step | what changes | rung before it | gain over it | lowest | highest | records |",
            "|---|---|---|---|---|---|---|"]
    for name in steps:
        try:
            gain = step_gain(name, gpu)
        except LookupError:
            rows.append(f"| `{name}` | {registry.STEPS[name].summary} | `{rung_before(name)}` | not measured in "
                        "one process | - | - | 0 |")
            continue
        rows.append(f"| `{name}` | {registry.STEPS[name].summary} | `{rung_before(name)}` | {gain.median:.2f}x | "
                    f"{gain.low:.2f}x | {gain.high:.2f}x | {gain.records} |")
    return "\n".join(rows)


def steps_table(chapter: str) -> str:
    """The registry's step table (the README's), cut to the rows of `chapter`'s steps."""
    head, rule, *rows = registry.markdown_table("t3").split("\n")
    steps = chapter_steps(chapter)
    return "\n".join([head, rule, *(row for row in rows if row.split("`")[1] in steps)])


def tuning_gain(gpu: str = CARD) -> spread.Spread:
    """The chain tuning's A/B in one process (its tuned picks' rate over its starting picks'), across
    every record of `gpu` that tuned inside the step (`chain_sweep`)."""
    ratios = [doc["chain_sweep"]["tuned_tok_s"] / doc["chain_sweep"]["start_tok_s"]
              for _, doc in _records(gpu) if "tuned_tok_s" in doc.get("chain_sweep", {})]
    if not ratios:
        raise LookupError(f"no committed record of {gpu} tuned inside the step: run `bench --tune` on that card")
    return spread.of(ratios)


def batch_record(gpu: str = CARD) -> tuple[Path, dict]:
    """The newest record of `gpu` whose batched decode holds the most batch sizes, one utterance
    among them: one process's view of how the rate grows with the batch."""
    batched = [(len(doc["batch"]["streams"]), index, path, doc) for index, (path, doc) in enumerate(_records(gpu))
               if "1" in doc.get("batch", {}).get("streams", {})]
    if not batched:
        raise LookupError(f"no committed record of {gpu} decoded batches: run `bench --batch 1 8 32 64` on that card")
    _, _, path, doc = max(batched, key=lambda b: (b[0], b[1]))
    return path, doc


def batch_gain(utterances: int, gpu: str = CARD) -> spread.Spread:
    """The aggregate decode rate of `utterances` decoded together over one utterance's, in the same
    process, across every record of `gpu` that measured both."""
    ratios = [streams[str(utterances)]["aggregate_tok_s"] / streams["1"]["aggregate_tok_s"]
              for _, doc in _records(gpu) for streams in [doc.get("batch", {}).get("streams", {})]
              if str(utterances) in streams and "1" in streams]
    if not ratios:
        raise LookupError(f"no committed record of {gpu} decoded 1 and {utterances} utterances in one process")
    return spread.of(ratios)


def cache_read_ms(doc: dict) -> dict[int, tuple[float, float]]:
    """Per batch size of `doc`: how long reading the whole KV cache once takes at the record's copy
    bandwidth, and the measured step (ms). Attention over the whole allocation reads all of it."""
    bandwidth = doc["roofline"]["copy_bandwidth_gb_s"] * 1e9
    return {int(n): (figures["kv_cache_mib"] * 2**20 / bandwidth * 1e3, figures["ms_per_step"])
            for n, figures in doc["batch"]["streams"].items()}


def bench_rungs() -> tuple:
    """The rungs of the one record every chapter's plot can read: upstream's loop, the guide's last
    rung, and each recommended step the chapters teach, in ladder order (the bench's `--experimental`
    adds the appendix's rungs)."""
    taught = {name for steps in CHAPTERS.values() for name in steps}
    return ("upstream_fp32", "compiled", *(name for name in registry.T3_STEPS
                                           if name in taught and registry.STEPS[name].status == "recommended"))


def record_gains_table(doc: dict) -> str:
    """Each chapter step `doc` measured: its rate and its gain over the rung before it in that one
    process (an experimental step's, over the recommended rung): the table a new record is read by."""
    rows = ["| chapter | step | T3 tok/s | over | gain |", "|---|---|---|---|---|"]
    for chapter, steps in CHAPTERS.items():
        for name in steps:
            rate = doc["rungs"].get(name, {}).get("t3_decode_tok_s")
            if not rate:
                continue
            over = "recommended" if registry.STEPS[name].status == "experimental" else rung_before(name)
            base = doc["rungs"].get(over, {}).get("t3_decode_tok_s")
            gain = f"{rate / base:.3f}x" if base else "-"
            rows.append(f"| {chapter} | `{name}` | {rate:,.0f} | `{over}` | {gain} |")
    return "\n".join(rows)


def gain_line(step: str, gpu: str | None = CARD) -> str:
    """One sentence of `step_gain`: the step over the rung before it, median and range, and how many
    records."""
    gain = step_gain(step, gpu)
    where = f" {gpu}" if gpu else ""
    count = "one" if gain.records == 1 else str(gain.records)
    return f"{step} over {rung_before(step)}: {gain.text(suffix='x')} across {count}{where} record" + \
        ("s" if gain.records > 1 else "")
