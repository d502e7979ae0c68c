"""The matvec kernels' grids and the attention kernel's layout tuned inside the decode step, not alone.

`fused_matvec.sweep` times each matmul on its own, call after call in a graph. There a grid of
many small programs wins: while some wait for their weights, others compute. Inside the step
under `launch_ahead` a kernel's programs load their weights before they wait for the kernel
before it, and the kernel after it launches only once all of its programs have started. A grid
larger than the SMs hold beside its neighbours runs in waves, and every wave after the first
starts loading its weights only after the wait, on the step's critical path. In the trace of
`fused_bookkeeping` at d989564, gate/up (2,048 programs, the sweep's choice) ends 8.4 us after o_proj
for 5.6 us of weights, and down launches only when gate/up's last wave starts.

The attention kernel's layout is tuned the same way: stretches of the slots, combined by the last
program to finish (a fence, an atomic and a second round trip after the wait), against shares
of the value dimensions that need no combine.

`tune` times whole decodes instead: for one kernel at a time (attention, then the largest
weights) it tries every candidate with the others fixed, recaptures the step, times the start and
the closest contenders again in alternating rounds and keeps the fastest (one pass of coordinate
descent). It then times the starting and the tuned configurations alternately, so the gain it
reports is measured like any A/B in this workbook.
"""
from __future__ import annotations

import statistics
from typing import Callable

from chatterbox_lab import registry
from chatterbox_lab.kernels import decode_attention, fused_matvec, staged_matvec
from chatterbox_lab.kernels.decode_attention import AttentionConfig
from chatterbox_lab.kernels.fused_matvec import KernelConfig
from chatterbox_lab.kernels.picks import KernelPicks, name_of

# Per thread, at most this many weights (or cached keys and values) loaded before the wait:
# beyond it the kernel spills them.
MAX_VALUES_PER_THREAD = 128
COLUMNS = (1, 2, 4, 8, 16)
# One or two warps reduce within a warp, with shuffles and no barrier between warps.
WARPS = (1, 2, 4, 8)
ATTENTION_SPLITS = (1, 2, 4, 8)
# Four and eight value shares measured slower than one or two at every split count on the H100
# (`beyond/...1602Z`): the keys each share reads cost more than the combine they save.
ATTENTION_PARTS = (1, 2)
ATTENTION_WARPS = (4, 8, 16, 32)
# A single measurement of each candidate picks by noise: in one H100 process the same
# configurations read 1,527 and 1,446 tok/s minutes apart, and two processes on one card kept
# gate/up, down and head configurations that decoded 3% apart (`beyond/...1233Z`, `...1241Z`). So the start
# and the candidates within CONTENDING of the fastest are measured again, alternately.
CONTENDING = 0.03
FINALISTS = 4
# Largest weights first: the calls whose grids run the most waves.
ORDER = ("gate_up", "down", "head", "qkv", "o_proj")
def candidates(n: int, k: int, gated: bool = False) -> list[KernelConfig]:
    """Grids for one matvec: a few output columns per program, the whole input row per load (or
    half of it, for long rows), 1 to 8 warps; none that would hold more than
    MAX_VALUES_PER_THREAD weights per thread."""
    row = min(4096, _power_of_two_from(k))
    blocks = (row, row // 2) if row > 1024 else (row,)
    found = []
    for block_n in COLUMNS:
        for block_k in blocks:
            for warps in WARPS:
                per_thread = block_n * block_k * (2 if gated else 1) // (32 * warps)
                if block_n <= n and per_thread <= MAX_VALUES_PER_THREAD:
                    found.append(KernelConfig(block_n, block_k, warps))
    return found


def attention_candidates(capacity: int, head_dim: int) -> list[AttentionConfig]:
    """Layouts of the attention kernel: each stretch of slots one block (up to 512 slots), the value
    dimensions in ATTENTION_PARTS shares, and the two fewest warps that hold the block's keys and values
    within MAX_VALUES_PER_THREAD."""
    found = []
    for splits in ATTENTION_SPLITS:
        block = max(decode_attention.BLOCK_SLOTS, min(512, _power_of_two_from(-(-capacity // splits))))
        for parts in (p for p in ATTENTION_PARTS if p <= head_dim):
            values = block * (head_dim + head_dim // parts)
            warps = [w for w in ATTENTION_WARPS if values // (32 * w) <= MAX_VALUES_PER_THREAD][:2]
            found += [AttentionConfig(splits, parts, block, w) for w in warps]
    return found


def _power_of_two_from(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tuned_steps(steps) -> frozenset:
    """The steps of a decoder the chain tuning tunes for: `steps` less those it runs without
    (`registry.Step.tuned_without`)."""
    return frozenset(name for name in steps if not registry.step(name).tuned_without)


def picks_from(record: dict, gpu: str | None) -> KernelPicks:
    """A bench record's tuned configurations, to start a tuning from (or run with) on the same card."""
    calls = record.get("chain_sweep", {}).get("calls")
    if not calls:
        raise ValueError("the record has no chain tuning (`chain_sweep`): start from a record of a bench run "
                         "with its sweeps on a GPU")
    if record["provenance"].get("gpu") != gpu:
        raise ValueError(f"the record was tuned on {record['provenance'].get('gpu') or 'a CPU'}, this is "
                         f"{gpu or 'a CPU'}: its picks are a start only for the card they were measured on")
    return KernelPicks.from_names({name: call["best"] for name, call in calls.items()},
                                  source=record["provenance"].get("command") or "a record", gpu=gpu)


def descend(knobs: dict[str, tuple], apply: Callable, rate: Callable[[], float], rounds: int = 3,
            revisit: tuple[str, ...] = ()) -> dict:
    """One pass of coordinate descent: knobs {name: (start, candidates)}, `apply(name, value)` sets
    one, `rate()` measures the whole (higher is better). Each knob keeps its best before the next is
    tried: every candidate is measured once, then the start and the others within CONTENDING of the
    fastest (FINALISTS in all at most) are measured again in `rounds` alternating rounds, and the
    best median wins. The knobs in `revisit` have their finalists measured once more after the pass,
    with every other knob at its best. Returns {name: {"start", "tried": {value: rate},
    "final": {value: [rates]}, "revisit": {value: [rates]}, "best"}}."""
    found = {}
    for name, (start, options) in knobs.items():
        tried = {}
        for value in options:
            apply(name, value)
            tried[value] = rate()
        fastest = max(tried.values())
        ahead = [value for value in sorted(tried, key=tried.get, reverse=True)
                 if value != start and tried[value] >= fastest - CONTENDING * abs(fastest)]
        final = _alternate(name, [start, *ahead][:FINALISTS], apply, rate, rounds)
        # Without a final the start stood alone, as the fastest, or there were no rounds to run.
        best = _best(final) if final else max(tried, key=tried.get)
        apply(name, best)
        found[name] = dict(start=start, tried=tried, final=final, revisit={}, best=best)
    for name in revisit:
        entry = found[name]
        entry["revisit"] = _alternate(name, list(entry["final"]), apply, rate, rounds)
        if entry["revisit"]:
            entry["best"] = _best(entry["revisit"])
        apply(name, entry["best"])
    return found


def _alternate(name: str, values: list, apply: Callable, rate: Callable[[], float], rounds: int) -> dict:
    """{value: [rates]}: each of `values` measured once a round, for `rounds` rounds; {} for fewer
    than two values or no rounds."""
    if len(values) < 2 or rounds < 1:
        return {}
    rates = {value: [] for value in values}
    for _ in range(rounds):
        for value in values:
            apply(name, value)
            rates[value].append(rate())
    return rates


def _best(rates: dict):
    return max(rates, key=lambda value: statistics.median(rates[value]))


def tune(decoder, decode: Callable[[], float], repeats: int = 3, ab_rounds: int = 3,
         final_rounds: int = 3) -> dict:
    """Tune `decoder`'s step (a captured one, with `fused_matvec` and `fused_attention`), starting from
    the picks it was built with: `decode()` runs one decode and returns its tokens per second. Leaves
    the fastest in `decoder.picks`, which a step reads when it is captured. Returns what was tried
    and the A/B of the starting against the tuned configurations."""
    if not hasattr(decoder.step_fn, "recapture"):
        raise ValueError("tuning recaptures the step: build the decoder with captured_graph")
    staged, keys, current, apply = _knobs(decoder)

    def rate():
        decoder.step_fn.recapture()
        decode()  # compiles a new configuration, warms up and captures
        return statistics.median(decode() for _ in range(repeats))

    # Attention first: its layout changes how many programs the matvec kernels have room for. The
    # matvecs' grids change its best in turn: in `beyond/...1250Z` the one pass kept 128-slot
    # stretches, measured against the matvecs' starting grids, where every record before it had
    # kept one 512-slot block a head. So its finalists are timed again once the matvecs are tuned.
    knobs = {"attention": (current("attention"), attention_candidates(decoder.capacity, decoder.forward.head_dim))}
    knobs.update({name: (current(name), (staged_matvec.candidates if name in staged else candidates)(*keys[name][1:]))
                  for name in ORDER})
    start = {name: knob[0] for name, knob in knobs.items()}
    found = descend(knobs, apply, rate, final_rounds, revisit=("attention",))
    tuned = {name: entry["best"] for name, entry in found.items()}

    def run_with(values):
        for name, value in values.items():
            apply(name, value)
        return rate()

    ab = {"start": [], "tuned": []}
    for _ in range(ab_rounds):  # each round ends on the tuned configurations, which stay in place
        ab["start"].append(run_with(start))
        ab["tuned"].append(run_with(tuned))

    return dict(
        method=f"coordinate descent over {', '.join(knobs)}; each candidate: step recaptured, one decode "
               f"to warm up, median tok/s of {repeats}; then the start and up to {FINALISTS - 1} others within "
               f"{CONTENDING:.0%} of the fastest again, alternately, {final_rounds} rounds, best median kept; "
               f"attention's finalists again after the pass; "
               f"then the starting and tuned configurations alternately, {ab_rounds} decodes each",
        calls={name: dict(start=name_of(entry["start"]), best=name_of(entry["best"]),
                          tried={name_of(value): r for value, r in entry["tried"].items()},
                          final={name_of(value): rates for value, rates in entry["final"].items()},
                          revisit={name_of(value): rates for value, rates in entry["revisit"].items()})
               for name, entry in found.items()},
        start_tok_s=statistics.median(ab["start"]), tuned_tok_s=statistics.median(ab["tuned"]), raw=ab)


def _knobs(decoder):
    """For `decoder`'s step: the calls it stages, each matvec's shape, and `current(knob)` and
    `apply(knob, config)` over the picks its forward captures with."""
    rows, capacity, forward = 2 * decoder.streams, decoder.capacity, decoder.forward
    staged = forward.staged  # these calls' knob is the staged kernel's config
    keys = {name: (rows, call["n"], call["k"], call.get("gated", False))
            for name, call in fused_matvec.step_calls(decoder.t3).items()}

    def current(name):
        if name == "attention":
            return forward.picks.attention(capacity)
        return (forward.picks.staged if name in staged else forward.picks.matvec)(name, *keys[name])

    def apply(name, value):
        forward.picks = forward.picks.with_pick(name, value)

    return staged, keys, current, apply


def markdown_table(found: dict) -> str:
    """`tune`'s record as a table: per knob, in the order tuned, its starting and its chosen value
    with the decode rate each gave (the knobs before it already tuned): the median of its last
    alternating rounds where the knob had them (records before them have none), else the one
    measurement."""
    rows = [f"| {name} | `{call['start']}` | {_rate(call, call['start'])} | `{call['best']}` | "
            f"{_rate(call, call['best'])} |" for name, call in found["calls"].items()]
    return "\n".join(["| knob | started as | tok/s | tuned to | tok/s |", "|---|---|---|---|---|", *rows])


def _rate(call: dict, value: str) -> str:
    rates = (call.get("revisit") or call.get("final") or {}).get(value)
    rate = statistics.median(rates) if rates else call["tried"].get(value)
    return "not tried" if rate is None else f"{rate:,.0f}"


def rounds_table(call: dict) -> str:
    """A revisited knob's finalists: the median rate of their rounds during the pass (the knobs
    after it at their starts) and after it (every other knob tuned)."""
    rows = [f"| `{name}` | {statistics.median(rates):,.0f} | {statistics.median(call['revisit'][name]):,.0f} |"
            for name, rates in call["final"].items()]
    return "\n".join(["| finalist | during the pass (tok/s) | after it (tok/s) |", "|---|---|---|", *rows])
