"""chain_tuning: candidates within the register budget, coordinate descent, and the wiring of `tune`."""
import pytest

from chatterbox_lab import registry
from chatterbox_lab.tuning import chain_tuning
from chatterbox_lab.kernels import decode_attention, fused_matvec
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.kernels.fused_matvec import KernelConfig
from chatterbox_lab.kernels.picks import KernelPicks, config_named, name_of
from chatterbox_lab.sampling import SamplingParams

CAPTURED = registry.ladder_prefix("captured_graph") - {"bf16"}


@pytest.mark.parametrize("n, k, gated", [(3072, 1024, False), (4096, 1024, True), (1024, 4096, False), (8, 80, False)])
def test_candidates_stay_within_the_register_budget_and_load_whole_rows(n, k, gated):
    found = chain_tuning.candidates(n, k, gated)
    assert found and len(set(found)) == len(found)
    row = 1 << (k - 1).bit_length()
    for config in found:
        assert config.block_n <= n and config.block_k in (row, row // 2)
        assert config.block_n * config.block_k * (2 if gated else 1) <= 32 * config.warps * 128
    assert any(c.block_k == row // 2 for c in found) == (row > 1024)


def test_descent_keeps_each_knobs_best_before_trying_the_next():
    state = {"a": 0, "b": 0}
    seen = []

    def apply(name, value):
        state[name] = value

    def rate():
        seen.append(dict(state))
        return -(state["a"] - 2) ** 2 - (state["b"] - state["a"]) ** 2  # b's best depends on a

    found = chain_tuning.descend({"a": (0, [0, 1, 2, 3]), "b": (0, [0, 1, 2, 3])}, apply, rate)
    # One pass: a is chosen with b at its start, then b with a at its best (not the joint optimum).
    assert state == {"a": 1, "b": 1} and found["a"]["best"] == 1 and found["b"]["best"] == 1
    assert found["a"]["tried"] == {0: -4, 1: -2, 2: -4, 3: -10}
    # Each knob's start and its candidates near the fastest, again in three alternating rounds.
    assert found["a"]["final"] == {0: [-4] * 3, 1: [-2] * 3} and found["b"]["final"] == {0: [-2] * 3, 1: [-1] * 3}
    assert [s["b"] for s in seen[:10]] == [0] * 10 and [s["a"] for s in seen[10:]] == [1] * 10
    assert [s["a"] for s in seen[4:10]] == [0, 1] * 3


def test_a_revisited_knob_is_decided_again_among_its_finalists_with_the_others_tuned():
    state = {"a": 0, "b": 0}

    def rate():  # a=1 is best with b at its start, a=2 once b is tuned
        return {(0, 0): 10, (1, 0): 12, (2, 0): 11.9, (2, 1): 20, (1, 1): 15, (0, 1): 14}[state["a"], state["b"]]

    found = chain_tuning.descend({"a": (0, [0, 1, 2]), "b": (0, [0, 1])}, state.__setitem__, rate, rounds=2,
                                 revisit=("a",))
    assert found["a"]["final"] == {0: [10, 10], 1: [12, 12], 2: [11.9, 11.9]} and found["b"]["best"] == 1
    assert found["a"]["revisit"] == {0: [14, 14], 1: [15, 15], 2: [20, 20]}
    assert found["a"]["best"] == 2 and state == {"a": 2, "b": 1}


def test_the_rounds_table_shows_each_finalists_median_during_and_after_the_pass():
    call = {"final": {"s8": [1455, 1456, 1455], "s1": [1465, 1456, 1451]},
            "revisit": {"s8": [1454, 1452, 1458], "s1": [1544, 1546, 1545]}}
    rows = chain_tuning.rounds_table(call).splitlines()
    assert rows[2:] == ["| `s8` | 1,455 | 1,454 |", "| `s1` | 1,456 | 1,545 |"]


def test_descent_keeps_the_best_median_of_the_rounds_not_the_screens_fluke():
    true_rates = {0: 100.0, 1: 101.0, 2: 99.5, 3: 90.0, 4: 100.5, 5: 100.2}
    screen = iter([100.0, 101.0, 103.0, 90.0, 100.5, 100.2])  # candidate 2 reads high once
    state = {}

    def rate():
        return next(screen, None) or true_rates[state["x"]]

    found = chain_tuning.descend({"x": (0, list(true_rates))}, state.__setitem__, rate)
    # The start and the three fastest others within CONTENDING: not 3 (13% behind), nor 5 (the fourth).
    assert list(found["x"]["final"]) == [0, 2, 1, 4]
    assert found["x"]["best"] == 1 == state["x"] and found["x"]["tried"][2] == 103.0


def test_tune_recaptures_for_every_candidate_and_leaves_the_fastest(tiny_tts, monkeypatch):
    """The decode here is real but its rate is made up (favouring 4 columns a program for gate/up
    and two value shares of attention): what is under test is that every knob is tried on a recaptured step and
    the winners are left in the decoder's picks, which its next capture reads."""
    monkeypatch.setattr(chain_tuning, "COLUMNS", (1, 4))
    monkeypatch.setattr(chain_tuning, "WARPS", (4,))
    decoder = T3Decoder(tiny_tts.t3, CAPTURED, max_new_tokens=4)
    text = text_tokens_for(tiny_tts, "Tuned in the chain.")
    recaptures = []
    recapture = decoder.step_fn.recapture
    monkeypatch.setattr(decoder.step_fn, "recapture", lambda: recaptures.append(1) or recapture())
    gate_up = next((2, c["n"], c["k"], True) for name, c in fused_matvec.step_calls(decoder.t3).items()
                   if name == "gate_up")

    def decode():
        decoder.generate(tiny_tts.conds.t3, text, 2, SamplingParams(), stop_on_eos=False)
        return 100.0 + (decoder.picks.matvec("gate_up", *gate_up).block_n == 4) + \
            (decoder.picks.attention(decoder.capacity).parts == 2)

    found = chain_tuning.tune(decoder, decode, repeats=1, ab_rounds=1, final_rounds=1)
    assert set(found["calls"]) == {*chain_tuning.ORDER, "attention"}
    tried = sum(len(entry["tried"]) for entry in found["calls"].values())
    again = sum(len(rates) for entry in found["calls"].values() for rounds in ("final", "revisit")
                for rates in entry[rounds].values())
    assert found["calls"]["attention"]["revisit"]  # its finalists again, after the matvecs
    assert len(recaptures) == tried + again + 2  # candidates, their finals, then the A/B's start and tuned ones
    assert found["calls"]["gate_up"]["best"].startswith("n4_")
    assert decoder.picks is decoder.forward.picks
    assert decoder.picks.matvec("gate_up", *gate_up).block_n == 4 and decoder.picks.attention(decoder.capacity).parts == 2
    assert found["tuned_tok_s"] == 102.0 and found["start_tok_s"] < 102.0


def test_every_candidates_name_reads_back_as_its_configuration():
    from chatterbox_lab.kernels import staged_matvec

    for config in (*chain_tuning.candidates(4096, 1024, True), *chain_tuning.attention_candidates(448, 64),
                   *staged_matvec.candidates(4096, 1024)):
        assert config_named(name_of(config)) == config


def test_a_name_that_is_no_configuration_is_refused():
    with pytest.raises(ValueError, match="names no kernel configuration"):
        config_named("n4_k1024")


def test_picks_come_from_a_tuned_record_of_the_same_card():
    record = {"provenance": {"gpu": "H"}, "chain_sweep": {"calls": {"qkv": {"best": "n4_k1024_w2"}}}}
    picks = chain_tuning.picks_from(record, "H")
    assert isinstance(picks, KernelPicks) and picks.names() == {"qkv": "n4_k1024_w2"} and picks.gpu == "H"
    assert picks.matvec("qkv", 2, 3072, 1024) == KernelConfig(4, 1024, 2)
    with pytest.raises(ValueError, match="tuned on H, this is G"):
        chain_tuning.picks_from(record, "G")
    with pytest.raises(ValueError, match="no chain tuning"):
        chain_tuning.picks_from({"provenance": {"gpu": "H"}}, "H")


def test_tune_starts_from_the_decoders_picks(tiny_tts, monkeypatch):
    monkeypatch.setattr(chain_tuning, "ORDER", ("qkv",))
    attention = decode_attention.default_config(256)
    monkeypatch.setattr(chain_tuning, "attention_candidates", lambda capacity, head_dim: [attention])
    monkeypatch.setattr(chain_tuning, "candidates", lambda n, k, gated=False: [KernelConfig(1, 128, 4)])
    start = KernelPicks().with_pick("qkv", KernelConfig(2, 128, 2)).with_pick("attention", attention)
    decoder = T3Decoder(tiny_tts.t3, CAPTURED, max_cache_len=256, max_new_tokens=4, picks=start)
    text = text_tokens_for(tiny_tts, "Tuned from a record.")

    def decode():
        decoder.generate(tiny_tts.conds.t3, text, 2, SamplingParams(), stop_on_eos=False)
        return 100.0

    found = chain_tuning.tune(decoder, decode, repeats=1, ab_rounds=1, final_rounds=1)
    assert found["calls"]["qkv"]["start"] == "n2_k128_w2" and "n2_k128_w2" in found["calls"]["qkv"]["final"]
    assert found["calls"]["attention"]["start"] == name_of(attention)


def test_picks_refuse_what_no_decoder_can_take_and_a_pick_of_the_other_matvec_kind_runs_the_default():
    from chatterbox_lab.kernels.staged_matvec import StagedConfig

    with pytest.raises(ValueError, match="no knob \\['prefetch_ahead'\\]"):
        KernelPicks.from_names({"prefetch_ahead": "n2_k128_w2"})
    with pytest.raises(ValueError, match="attention takes a AttentionConfig"):
        KernelPicks().with_pick("attention", KernelConfig(2, 128, 2))
    # A staged configuration for a call this decoder does not stage: its plain kernel runs its default.
    staged = KernelPicks().with_pick("qkv", StagedConfig(16, 256, 4, 4, 4))
    assert staged.matvec("qkv", 2, 3072, 1024) == fused_matvec.default_config(3072, 1024)
    assert staged.staged("qkv", 2, 3072, 1024) == StagedConfig(16, 256, 4, 4, 4)


def test_a_decoders_picks_are_the_ones_its_next_capture_reads(tiny_tts):
    attention = decode_attention.AttentionConfig(1, 2, 512, 16)
    picks = KernelPicks().with_pick("qkv", KernelConfig(2, 128, 2)).with_pick("attention", attention)
    decoder = T3Decoder(tiny_tts.t3, CAPTURED, max_new_tokens=4, picks=picks)
    qkv = next((2, c["n"], c["k"], False) for name, c in fused_matvec.step_calls(decoder.t3).items() if name == "qkv")
    assert decoder.picks is decoder.forward.picks is picks
    assert decoder.forward.picks.matvec("qkv", *qkv) == KernelConfig(2, 128, 2)
    assert decoder.forward.picks.attention(decoder.capacity) == attention
    # Other row counts than the picks were tuned for run the defaults.
    assert decoder.forward.picks.matvec("qkv", 6, *qkv[1:]) == fused_matvec.default_config(*qkv[1:])
    assert T3Decoder(tiny_tts.t3, CAPTURED, max_new_tokens=4).picks == KernelPicks()


@pytest.mark.parametrize("capacity", [128, 448, 1024])
def test_attention_candidates_hold_one_stretch_in_a_block_within_the_registers(capacity):
    found = chain_tuning.attention_candidates(capacity, 64)
    assert {c.splits for c in found} == set(chain_tuning.ATTENTION_SPLITS)
    assert {c.parts for c in found} == set(chain_tuning.ATTENTION_PARTS)
    for c in found:
        assert c.block >= min(512, -(-capacity // c.splits)) or c.block == 512
        assert c.block * (64 + 64 // c.parts) <= 32 * c.warps * chain_tuning.MAX_VALUES_PER_THREAD


def test_tune_needs_a_captured_step(tiny_tts):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache",))
    with pytest.raises(ValueError, match="captured_graph"):
        chain_tuning.tune(decoder, lambda: 1.0)


def test_the_table_names_each_knob_in_the_order_tuned():
    found = {"calls": {"attention": {"start": "s8_p1_b64_w4", "best": "s1_p1_b512_w16",
                                     "tried": {"s8_p1_b64_w4": 1300.0, "s1_p1_b512_w16": 1365.4}},
                       "gate_up": {"start": "n9", "best": "n8_k1024_w4", "tried": {"n8_k1024_w4": 1370.0}}}}
    lines = chain_tuning.markdown_table(found).splitlines()
    assert lines[2] == "| attention | `s8_p1_b64_w4` | 1,300 | `s1_p1_b512_w16` | 1,365 |"
    assert lines[3] == "| gate_up | `n9` | not tried | `n8_k1024_w4` | 1,370 |"


def test_the_bench_tunes_the_plain_chain_even_when_the_last_rung_replaces_its_kernels():
    from chatterbox_lab.measure.bench import BenchConfig, _chain_steps, rung_steps

    steps = _chain_steps(BenchConfig(rungs=("fused_bookkeeping", "persistent_layers"), device="cpu").resolved())
    assert steps == rung_steps("persistent_layers", "cpu") - {"persistent_layers"}
    registry.check(steps, model="t3")
    every = frozenset(registry.preset("all", "hopper"))
    assert chain_tuning.tuned_steps(every) == every - {"multi_step_graph", "head_handoff", "persistent_layers"}
    registry.check(chain_tuning.tuned_steps(every), model="t3")


def test_the_bench_without_tuning_runs_a_records_picks_untuned(tiny_tts, tmp_path, monkeypatch):
    from chatterbox_lab.measure import bench

    monkeypatch.setattr(bench.results, "load", lambda path: {"chain_sweep": {"calls": {"qkv": {"best": "n2_k128_w2"}}},
                                                             "provenance": {"gpu": None, "command": "record.json"}})
    monkeypatch.setattr(bench, "configure_chain", lambda *args, **kwargs: pytest.fail("not tuning, so no chain"))
    monkeypatch.setattr(chain_tuning, "tune", lambda *args, **kwargs: pytest.fail("not tuning"))
    ran_with = []
    monkeypatch.setattr(bench, "measure_rung", lambda tts, rung, cfg, *args: ran_with.append(cfg.picks) or {})
    cfg = bench.BenchConfig(rungs=("captured_graph",), device="cpu", tokens=4, tune_from="record.json").resolved()
    assert not cfg.tune and cfg.picks.names() == {"qkv": "n2_k128_w2"} and cfg.picks.source == "record.json"
    doc = {"rungs": {}, "checks": {}}
    assert bench._time_everything(tiny_tts, cfg, tmp_path / "unused.wav", doc, None, None, None, False, None).picks \
        == cfg.picks
    assert ran_with == [cfg.picks]


def test_configure_chain_always_tunes_and_returns_the_tuned_picks(tiny_tts, tmp_path, monkeypatch):
    from chatterbox_lab.measure import bench

    # Kept in fp32: the casting decoder would change the session's tiny model for every later test.
    monkeypatch.setattr(bench, "T3Decoder", lambda t3, steps, **kw: T3Decoder(t3, steps - {"bf16"}, **kw))
    monkeypatch.setattr(bench, "prepare_voice", lambda tts, voice: None)
    tuned = KernelConfig(4, 128, 4)

    def tune(decoder, decode):
        assert decoder.picks == cfg.picks  # started from the configuration's picks
        decoder.forward.picks = decoder.picks.with_pick("qkv", tuned)
        return {"calls": {}}

    monkeypatch.setattr(chain_tuning, "tune", tune)
    start = KernelPicks(source="a record").with_pick("down", KernelConfig(2, 128, 2))
    cfg = bench.BenchConfig(rungs=("captured_graph",), device="cpu", tokens=4, picks=start).resolved()
    found, picks = bench.configure_chain(tiny_tts, cfg, tmp_path / "unused.wav")
    assert found["started_from"] == "a record" and found["steps"] == sorted(bench._chain_steps(cfg))
    assert picks.names() == {"down": "n2_k128_w2", "qkv": "n4_k128_w4"}
    assert picks.source == "chain tuning in this run" and picks.gpu is None
