"""Which committed records count for a rung's figure, and the figure's median and range across them."""
import pytest

from chatterbox_lab import registry
from chatterbox_lab.records import report, spread

GPU = report.HEADLINE_GPU


def _doc(rungs: dict, gpu: str = GPU, tokens: int = 256) -> dict:
    return dict(provenance=dict(gpu=gpu, preset="full", tokens=tokens), rungs=rungs)


def test_a_guide_rung_counts_on_its_name_and_recommended_only_with_todays_steps():
    today = sorted(registry.preset("recommended"))
    assert spread.counts(_doc({"compiled": {}}), "compiled", GPU)
    assert not spread.counts(_doc({"compiled": {}}, gpu="NVIDIA H200"), "compiled", GPU)
    assert not spread.counts(_doc({"compiled": {}}, tokens=64), "compiled", GPU)
    # A record that does not say which steps its recommended rung ran does not count.
    assert not spread.counts(_doc({"recommended": {}}), "recommended", GPU)
    assert spread.counts(_doc({"recommended": {"t3_steps": today}}), "recommended", GPU)
    assert not spread.counts(_doc({"recommended": {"t3_steps": today[:-1]}}), "recommended", GPU)
    # Without steps of its own, the last T3 rung has those its S3Gen rungs decoded with.
    s3gen = registry.preset("recommended", model="s3gen")
    ladder = _doc({"compiled": {}, "recommended": {},
                   s3gen[0]: {"t3_steps": today, "s3gen_steps": [s3gen[0]]}})
    assert spread.counts(ladder, "recommended", GPU) and spread.counts(ladder, s3gen[0], GPU)


def test_a_spread_reads_as_median_and_range():
    assert spread.of([3.0, 1.0, 2.0]) == spread.Spread(2.0, 1.0, 3.0, 3)
    assert spread.of([521.0, 539.0, 548.0]).text(suffix="x") == "539x (521–548x)"
    assert spread.of([1645.0]).text() == "1,645"
    with pytest.raises(ValueError, match="no values"):
        spread.of([])


def test_the_committed_records_spread_as_the_headline_says():
    compiled = spread.rung_spread("compiled", "t3_decode_tok_s", GPU)
    upstream = spread.rung_spread("upstream_fp32", "t3_decode_tok_s", GPU)
    assert compiled.records >= 30 and compiled.low < compiled.median < compiled.high
    # Upstream's host-bound loop moves far more between processes than the compiled step does.
    assert upstream.high / upstream.low > 1.5 > compiled.high / compiled.low
    assert spread.rung_spread("recommended", "t3_decode_tok_s", GPU).records >= 1
    with pytest.raises(LookupError, match="bench --ladder"):
        spread.rung_spread("recommended", "t3_decode_tok_s", "a card with no records")
    assert "| `compiled` |" in report.headline_section()


def test_a_headline_rung_without_records_of_its_steps_says_so(monkeypatch):
    monkeypatch.setattr(spread, "todays_steps", lambda rung, device_kind="hopper": (frozenset({"bf16"}), frozenset()))
    assert "| `recommended` | the " in report.headline_section()
    assert "| 0 | not yet measured with these steps |" in report.headline_section()
