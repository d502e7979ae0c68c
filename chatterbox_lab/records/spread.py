"""A rung's figure across every committed record that measured it comparably: its median and range.

One record is one process on one card, and upstream's host-bound loop moves by half from one process
to the next, so a figure is quoted with its spread. A record counts for a rung when it is:

- from the same card model, with the `full` preset and 256 speech tokens;
- of the rung as it is today. A guide rung's name fixes its steps (the guide's steps come first in
  ladder order), so every record of it counts. `recommended` counts only where the record's steps are
  today's recommended set: older records of it ran fewer steps.

Records come from `data/results/` and its folders of GPU runs (`beyond`, `e2e`).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from chatterbox_lab import registry
from chatterbox_lab.records import results

FOLDERS = ("", "beyond", "e2e")
PRESET, TOKENS = "full", 256
UPSTREAM = "upstream_fp32"


@dataclass(frozen=True)
class Spread:
    """A figure's median over `records` committed records, and its lowest and highest value."""
    median: float
    low: float
    high: float
    records: int

    def text(self, digits: int = 3, suffix: str = "") -> str:
        """"1,645x" for one record, "539x (521–548x)" for several (with `suffix` "x")."""
        median, low, high = (results.fmt(float(v), digits) for v in (self.median, self.low, self.high))
        if self.records == 1:
            return median + suffix
        return f"{median}{suffix} ({low}–{high}{suffix})"


def of(values) -> Spread:
    values = list(values)
    if not values:
        raise ValueError("no values to take a spread of")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def recorded_steps(doc: dict, rung: str) -> tuple[frozenset | None, frozenset]:
    """The (T3, S3Gen) steps `rung` ran with in `doc`. T3's are None where the record does not say:
    a T3 rung's own `t3_steps`, or, for the last T3 rung, those of the record's S3Gen rungs (they
    decode with its decoder)."""
    figures = doc["rungs"][rung]
    s3gen = frozenset(figures.get("s3gen_steps", ()))
    if "t3_steps" in figures:
        return frozenset(figures["t3_steps"]), s3gen
    t3_rungs = [name for name in doc["rungs"] if name not in registry.S3GEN_STEPS]
    s3gen_rungs = [name for name in doc["rungs"] if name in registry.S3GEN_STEPS]
    if s3gen_rungs and t3_rungs[-1] == rung:
        return frozenset(doc["rungs"][s3gen_rungs[0]]["t3_steps"]), s3gen
    return None, s3gen


def todays_steps(rung: str, device_kind: str = "hopper") -> tuple[frozenset, frozenset]:
    """The (T3, S3Gen) steps of `rung` as the bench runs it today: a T3 step's rung is it and the
    supported steps before it (an experimental one's, the recommended set and it); an S3Gen step's
    rung decodes with the recommended T3 steps and adds S3Gen's recommended steps up to it."""
    recommended = frozenset(registry.preset("recommended", device_kind))
    if rung == UPSTREAM:
        return frozenset(), frozenset()
    if rung == "recommended":
        return recommended, frozenset()
    if rung in registry.S3GEN_STEPS:
        s3gen = registry.preset("recommended", device_kind, model="s3gen")
        upto = s3gen[: s3gen.index(rung) + 1] if rung in s3gen else (*s3gen, rung)
        return recommended, frozenset(upto)
    if registry.step(rung).status == "experimental":
        return recommended | {rung} | registry.requirements(rung), frozenset()
    return frozenset(n for n in registry.ladder_prefix(rung) if registry.STEPS[n].status != "experimental"), \
        frozenset()


def counts(doc: dict, rung: str, gpu: str, device_kind: str = "hopper") -> bool:
    """Whether `doc` holds a comparable measurement of `rung` on `gpu` (see the module's docstring)."""
    prov = doc["provenance"]
    if prov.get("gpu") != gpu or prov.get("preset") != PRESET or prov.get("tokens") != TOKENS:
        return False
    if rung not in doc["rungs"]:
        return False
    guide = rung in registry.STEPS and registry.STEPS[rung].status == "guide"
    if rung == UPSTREAM or guide:
        return True
    return recorded_steps(doc, rung) == todays_steps(rung, device_kind)


def records_of(rung: str, gpu: str, device_kind: str = "hopper") -> list[tuple[Path, dict]]:
    """Every committed record that counts for `rung` on `gpu`, oldest first."""
    found = [(path, doc) for folder in FOLDERS for path, doc in results.committed(gpu_only=True, folder=folder)
             if counts(doc, rung, gpu, device_kind)]
    return sorted(found, key=lambda pd: pd[1]["provenance"]["date_utc"])


def rung_spread(rung: str, figure: str, gpu: str, device_kind: str = "hopper") -> Spread:
    """`figure` of `rung` across the records that count for it on `gpu`."""
    found = records_of(rung, gpu, device_kind)
    if not found:
        raise LookupError(f"no committed {PRESET} record of {gpu} with {TOKENS} tokens measured {rung!r} "
                          f"with today's steps: run `python -m chatterbox_lab bench --ladder` on that card")
    return of(doc["rungs"][rung][figure] for _, doc in found)


def speedup_spread(rung: str, gpu: str, device_kind: str = "hopper") -> Spread:
    """`rung`'s T3 decode rate over upstream's in the same process, across the records that count for
    it and also measured upstream: a ratio within one record, so one process's host speed cancels."""
    ratios = [doc["rungs"][rung]["t3_decode_tok_s"] / doc["rungs"][UPSTREAM]["t3_decode_tok_s"]
              for _, doc in records_of(rung, gpu, device_kind) if UPSTREAM in doc["rungs"]]
    if not ratios:
        raise LookupError(f"no committed record of {gpu} measured {rung!r} and {UPSTREAM} in one process")
    return of(ratios)
