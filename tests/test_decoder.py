import copy
from unittest import mock

import pytest
import torch

from chatterbox_lab import registry
from chatterbox_lab.measure import equivalence
from chatterbox_lab.measure.quality import EIGHT_BIT_STEPS
from chatterbox_lab.decode.compiled_step import compile_counters
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.kv_cache import CacheOverflowError
from chatterbox_lab.sampling import SamplingParams

# Every step but bf16 (whose tokens are not upstream's fp32 ones), the 8-bit formats (which round
# values; `measure/quality.py` measures them) and captured_graph (which replaces the compiled step;
# tested on its own) with the steps built on it.
TOP = tuple(step for step in registry.T3_STEPS
            if step not in {"bf16", "captured_graph", *EIGHT_BIT_STEPS} | registry.dependents("captured_graph"))
STEP_SETS = [(), ("static_cache",), ("embed_cache",), ("static_cache", "embed_cache"), ("static_cache", "prefill_graph"),
             ("static_cache", "embed_cache", "compiled"), ("static_cache", "embed_cache", "fused_projections"),
             ("static_cache", "embed_cache", "compiled", "fused_projections", "sampling_in_graph"), TOP]


@pytest.fixture(scope="module")
def text_tokens(tiny_tts):
    return text_tokens_for(tiny_tts, "Every step is measured and checked against upstream.")


def test_fp32_tokens_identical_to_upstream(tiny_tts, text_tokens):
    verdicts = equivalence.token_identity(tiny_tts, text_tokens, STEP_SETS, n=40, seed=11)
    assert all(verdicts.values()), verdicts


def test_identical_with_other_sampling_values(tiny_tts, text_tokens):
    sampling = SamplingParams(temperature=1.3, cfg_weight=0.0, repetition_penalty=2.0, min_p=0.2, top_p=0.7)
    reference = equivalence.seeded_tokens(tiny_tts, text_tokens, 30, 4, sampling=sampling)
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"))
    assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 30, 4, decoder, sampling), reference)


def test_bf16_logits_within_tolerance(tiny_tts, text_tokens):
    forced = equivalence.seeded_tokens(tiny_tts, text_tokens, 24, 2)
    reference = equivalence.reference_logits(tiny_tts, text_tokens, forced)
    t3 = copy.deepcopy(tiny_tts.t3)
    for steps in [("bf16",), ("bf16", "static_cache", "embed_cache")]:
        decoder = T3Decoder(t3, steps)
        assert decoder.dtype == torch.bfloat16
        err = equivalence.relative_error(equivalence.forced_logits(decoder, tiny_tts.conds.t3, text_tokens, forced), reference)
        assert err < equivalence.BF16_LOGIT_TOLERANCE, (steps, err)


def test_cache_overflow_is_refused(tiny_tts, text_tokens):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache",), max_cache_len=64)
    with pytest.raises(CacheOverflowError, match=r"needs \d+ KV-cache slots .* holds 64: build the decoder with max_cache_len >= \d+"):
        decoder.generate(tiny_tts.conds.t3, text_tokens, 100)


def test_token_count_limits(tiny_tts, text_tokens):
    decoder = T3Decoder(tiny_tts.t3, ())
    with pytest.raises(ValueError, match="max_new_tokens must be between 1 and"):
        decoder.generate(tiny_tts.conds.t3, text_tokens, 0)


def test_step_rules():
    assert registry.ladder_prefix("embed_cache") == {"bf16", "static_cache", "embed_cache"}
    assert registry.ladder_prefix(registry.T3_STEPS[-1]) == set(registry.T3_STEPS)
    assert "filled_cache_attention" not in registry.ladder_prefix("sampling_in_graph")
    assert registry.check(registry.GUIDE, model="t3") == set(registry.GUIDE)
    with pytest.raises(ValueError, match="needs static_cache, embed_cache"):
        registry.check(["compiled"], model="t3")
    with pytest.raises(ValueError, match="'sampling_in_graph' needs compiled"):
        registry.check(["static_cache", "embed_cache", "sampling_in_graph"], model="t3")
    with pytest.raises(ValueError, match="unknown t3 steps"):
        registry.check(["fp8"], model="t3")
    with pytest.raises(ValueError, match="unknown t3 steps"):
        registry.check(["flow_graphs"], model="t3")


def test_filled_cache_attention_needs_whole_blocks(tiny_tts):
    with pytest.raises(ValueError, match="blocks of 64 slots: max_cache_len must be a multiple of it, got 100"):
        T3Decoder(tiny_tts.t3, registry.ladder_prefix("filled_cache_attention") - {"bf16"}, max_cache_len=100)


def test_filled_cache_mask_reads_only_filled_blocks_and_matches_masked_attention():
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from chatterbox_lab.decode.kv_cache import StaticKVCache
    from chatterbox_lab.decode.t3_forward import filled_cache_mask

    torch.manual_seed(0)
    prompt_lens, step_index, heads, capacity = torch.tensor([10, 70, 130]), torch.tensor([3]), 2, 256
    mask = filled_cache_mask(prompt_lens, step_index, heads, capacity)
    assert mask.kv_num_blocks[:, 0, 0].tolist() == [1, 1, 2, 2, 3, 3]  # of 4 blocks of 64
    q, k, v = torch.randn(6, heads, 1, 16), torch.randn(6, heads, capacity, 16), torch.randn(6, heads, capacity, 16)
    positions = (prompt_lens + step_index).repeat_interleave(2)[:, None]
    cache = StaticKVCache(1, 6, heads, capacity, 16, torch.float32, "cpu")
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(positions))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask), reference)


@pytest.mark.parametrize("steps", [("static_cache", "embed_cache", "compiled"), TOP])
def test_switching_speaker_text_and_sampling_does_not_recompile(tiny_tts, steps):
    from chatterbox_lab.pipeline.voices import VoiceCache

    voices = VoiceCache(tiny_tts)
    decoder = T3Decoder(tiny_tts.t3, steps, max_cache_len=256)
    first = text_tokens_for(tiny_tts, "A first sentence.")
    decoder.generate(voices.use("alto").t3, first, 8)
    decoder.generate(voices.use("tenor").t3, first, 8)  # both voices prepared, step warm
    before = compile_counters()
    requests = [("alto", "A much longer second sentence, with other words in it.", SamplingParams()),
                ("tenor", "Third.", SamplingParams(temperature=0.5, cfg_weight=0.3, top_p=0.9)),
                ("alto", "A first sentence.", SamplingParams(repetition_penalty=1.5, min_p=0.1))]
    for voice, text, sampling in requests:
        decoder.generate(voices.use(voice).t3, text_tokens_for(tiny_tts, text), 12, sampling)
    assert compile_counters() == before
    assert voices.prepared_count == 2


GREEDY = SamplingParams(top_p=1e-6)  # keeps only the most likely token: no randomness left


@pytest.fixture(scope="module")
def three_utterances(tiny_tts):
    from chatterbox_lab.pipeline.voices import VoiceCache

    voices = VoiceCache(tiny_tts)
    conds = [voices.use(v).t3 for v in ("alto", "tenor", "alto")]
    texts = [text_tokens_for(tiny_tts, t) for t in ("A first sentence.", "The second one is longer than the first.",
                                                     "Third!")]
    return conds, texts


@pytest.mark.parametrize("steps", [("static_cache", "embed_cache"), TOP])
def test_batched_utterances_match_one_at_a_time(tiny_tts, three_utterances, steps):
    """Each utterance of a batch (own voice, text and prompt length) gets the tokens it gets alone."""
    conds, texts = three_utterances
    batch = T3Decoder(tiny_tts.t3, steps, streams=3, max_new_tokens=30)
    result = batch.generate_batch(conds, texts, 30, GREEDY, stop_on_eos=False)
    single = T3Decoder(tiny_tts.t3, steps, max_new_tokens=30)
    for cond, text, tokens in zip(conds, texts, result.all_tokens):
        assert torch.equal(single.generate(cond, text, 30, GREEDY, stop_on_eos=False).tokens, tokens)
    assert result.aggregate_tok_s == pytest.approx(3 * result.decode_tok_s)


@pytest.mark.parametrize("steps", [("static_cache", "embed_cache"), TOP])
def test_each_utterance_of_a_batch_keeps_its_own_sampling_values(tiny_tts, three_utterances, steps):
    """Requests decoded together: each stream's values (CFG weight, penalty, temperature) give it the
    tokens it gets alone with them. Greedy top-p makes the draws irrelevant, so tokens must match."""
    conds, texts = three_utterances
    values = [GREEDY, SamplingParams(top_p=1e-6, cfg_weight=0.0, repetition_penalty=2.0),
              SamplingParams(top_p=1e-6, temperature=0.5, cfg_weight=0.9, repetition_penalty=1.0)]
    result = T3Decoder(tiny_tts.t3, steps, streams=3, max_new_tokens=20).generate_batch(
        conds, texts, 20, values, stop_on_eos=False)
    single = T3Decoder(tiny_tts.t3, steps, max_new_tokens=20)
    alone = [single.generate(c, t, 20, v, stop_on_eos=False).tokens for c, t, v in zip(conds, texts, values)]
    assert all(torch.equal(a, b) for a, b in zip(alone, result.all_tokens))
    # The values matter: with the first stream's values, the second stream's tokens differ.
    assert not torch.equal(single.generate(conds[1], texts[1], 20, GREEDY, stop_on_eos=False).tokens, alone[1])


def test_prompts_of_any_lengths_share_one_prefill_and_keep_their_own_tokens(tiny_tts, three_utterances):
    """Each prompt padded at its end to the longest, one forward pass for all: each row's logits are
    read at its own last position, and its padding's cache slots are overwritten before they are read."""
    conds, texts = three_utterances
    assert len({t.size(-1) for t in texts}) == 3
    steps = ("static_cache", "embed_cache")
    batch = T3Decoder(tiny_tts.t3, steps, streams=3, max_new_tokens=20)
    single = T3Decoder(tiny_tts.t3, steps, max_new_tokens=20)
    forward = type(batch.forward)
    with torch.inference_mode():
        with mock.patch.object(forward, "__call__", autospec=True, side_effect=forward.__call__) as passes:
            logits = batch.prefill_streams(conds, texts, 20, cfg_weight=0.5)
        assert passes.call_count == 1
        for i, (cond, text) in enumerate(zip(conds, texts)):
            torch.testing.assert_close(logits[2 * i: 2 * i + 2], single.prefill(cond, text, 20, cfg_weight=0.5),
                                       rtol=1e-5, atol=1e-5)
    result = batch.generate_batch(conds, texts, 20, GREEDY, stop_on_eos=False)
    for cond, text, tokens in zip(conds, texts, result.all_tokens):
        assert torch.equal(single.generate(cond, text, 20, GREEDY, stop_on_eos=False).tokens, tokens)


def test_each_utterance_stops_at_its_own_stop_token(tiny_tts, three_utterances):
    conds, texts = three_utterances
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"), streams=3, max_new_tokens=40)
    free = decoder.generate_batch(conds, texts, 40, GREEDY, stop_on_eos=False).all_tokens
    # Declare a token the second utterance produces as the stop token: only it is cut there.
    stop = int(free[1][0, 5])
    hp = tiny_tts.t3.hp
    original, hp.stop_speech_token = hp.stop_speech_token, stop
    try:
        cut = decoder.generate_batch(conds, texts, 40, GREEDY).all_tokens
    finally:
        hp.stop_speech_token = original
    for tokens, full in zip(cut, free):
        hits = (full[0] == stop).nonzero()
        expected = int(hits[0]) + 1 if len(hits) else 40
        assert torch.equal(tokens, full[:, :expected])
    assert cut[1].size(1) <= 6


def test_batch_size_must_match(tiny_tts, three_utterances):
    conds, texts = three_utterances
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"), streams=2)
    with pytest.raises(ValueError, match="decodes 2 utterance"):
        decoder.generate_batch(conds, texts, 8)
    with pytest.raises(ValueError, match="needs static_cache and embed_cache"):
        T3Decoder(tiny_tts.t3, (), streams=2)


def test_captured_graph_step_gives_the_compiled_steps_tokens(tiny_tts, text_tokens):
    """On the CPU the captured step runs eagerly: the same step as the compiled one, without Inductor."""
    from chatterbox_lab.decode.compiled_step import CapturedStep

    captured = T3Decoder(tiny_tts.t3, TOP + ("captured_graph",))
    assert isinstance(captured.step_fn, CapturedStep)
    for seed in (5, 6):
        want = equivalence.seeded_tokens(tiny_tts, text_tokens, 24, seed, T3Decoder(tiny_tts.t3, TOP))
        assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 24, seed, captured), want)


def test_multi_step_graph_runs_every_step_between_two_checks_once(tiny_tts, text_tokens, monkeypatch):
    """Runs of steps: as many steps as tokens, the same tokens, and stream chunks still cut at the
    checks (on the CPU a run is its steps one by one, as the graph replays them)."""
    from chatterbox_lab.decode.compiled_step import CapturedStep

    runs = []
    monkeypatch.setattr(CapturedStep, "run", lambda self, steps, run=CapturedStep.run: (runs.append(steps),
                                                                                       run(self, steps)))
    decoder = T3Decoder(tiny_tts.t3, TOP + ("captured_graph", "multi_step_graph"))
    assert decoder.step_fn.runs
    step_by_step = T3Decoder(tiny_tts.t3, TOP + ("captured_graph",))
    tokens = {}
    for name, each in (("step by step", step_by_step), ("runs", decoder)):
        torch.manual_seed(3)
        runs.clear()
        tokens[name] = each.generate(tiny_tts.conds.t3, text_tokens, 40, stop_on_eos=False).tokens
    assert torch.equal(tokens["runs"], tokens["step by step"]) and tokens["runs"].shape == (1, 40)
    assert runs == [15, 16, 8]  # the first token is the prefill's; checks at 16, 32 and the last
    chunks = [len(c[0]) for c, _ in decoder.generate_stream(tiny_tts.conds.t3, text_tokens, 40, chunk_tokens=16,
                                                             first_chunk_tokens=5)]
    assert sum(chunks) <= 40 and chunks[0] == 5


@pytest.mark.parametrize("fold", [(), ("folded_prologue",)])
def test_fused_bookkeeping_gives_the_same_tokens(tiny_tts, text_tokens, interpreted, monkeypatch, fold):
    """The prologue and sampling kernels, run by Triton's interpreter, keep the decode state as the
    PyTorch bookkeeping does, with the prologue a kernel of each step or folded into the sampling
    kernel: the same tokens for the same seed, the same mask and step counter. The layers stay
    PyTorch's here (their kernels are tested on their own), which keeps the interpreter fast."""
    from chatterbox_lab.kernels import decode_attention, fused_matvec

    monkeypatch.setattr(fused_matvec, "kernel_applies", lambda x, weight: False)
    monkeypatch.setattr(decode_attention, "kernel_applies", lambda q: False)
    steps = registry.ladder_prefix("fused_bookkeeping") - {"bf16", "dependent_launch", "launch_ahead"}
    pytorch = T3Decoder(tiny_tts.t3, steps - {"fused_bookkeeping"})
    kernels = T3Decoder(tiny_tts.t3, steps | set(fold))
    want = equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 5, pytorch)
    assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 5, kernels), want)
    assert torch.equal(kernels.step_index, pytorch.step_index)
    # Folded, the mask also holds the last token: marked for the step after, which never runs.
    last = kernels.tokens.index_select(1, kernels.step_index)
    assert torch.equal(kernels.seen, pytorch.seen.scatter(1, last, True) if fold else pytorch.seen)
    assert int(kernels.step_inputs.out.arrivals) == 0


@pytest.mark.parametrize("fold", [(), ("folded_prologue",)])
def test_fused_bookkeeping_keeps_each_utterance_of_a_batch_apart(tiny_tts, three_utterances, interpreted,
                                                                  monkeypatch, fold):
    """Three utterances with their own prompt lengths: the prologue's per-row positions and the
    sampling kernel's token writes (with the prologue folded into it or not) give each the tokens
    the PyTorch bookkeeping gives it."""
    from chatterbox_lab.kernels import decode_attention, fused_matvec

    monkeypatch.setattr(fused_matvec, "kernel_applies", lambda x, weight: False)
    monkeypatch.setattr(decode_attention, "kernel_applies", lambda q: False)
    conds, texts = three_utterances
    steps = registry.ladder_prefix("fused_bookkeeping") - {"bf16", "dependent_launch", "launch_ahead"}
    want, got = (T3Decoder(tiny_tts.t3, s, streams=3, max_new_tokens=10).generate_batch(
        conds, texts, 10, GREEDY, stop_on_eos=False).all_tokens for s in (steps - {"fused_bookkeeping"}, steps | set(fold)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_hopper_steps_are_left_out_of_the_rungs_where_they_cannot_run(tiny_tts):
    from chatterbox_lab.decode.plan import unsupported_steps
    from chatterbox_lab.measure.bench import RUNGS, rung_steps

    gpu_only = {"dependent_launch", "launch_ahead", "staged_weights", "staged_head", "fp8_weights"}
    assert unsupported_steps("cpu") == gpu_only
    for rung in RUNGS:
        steps = rung_steps(rung, "cpu")
        assert not steps & gpu_only, rung
        registry.check(steps, model="t3")
    # The rungs after them still run there, without them.
    experimental = {step for step in registry.T3_STEPS if registry.STEPS[step].status == "experimental"}
    assert rung_steps("prefill_graph", "cpu") == registry.ladder_prefix("prefill_graph") - gpu_only - experimental
    assert "persistent_layers" in rung_steps("persistent_layers", "cpu")
    with pytest.raises(RuntimeError, match="Hopper or later GPU"):
        from chatterbox_lab.kernels.fused_matvec import check_dependent_launch

        check_dependent_launch("cpu")


def test_a_run_is_queued_ahead_of_its_check_and_a_stop_still_ends_at_that_check(tiny_tts, text_tokens,
                                                                                 monkeypatch):
    from chatterbox_lab.decode.compiled_step import CapturedStep

    runs = []
    monkeypatch.setattr(CapturedStep, "run", lambda self, steps, run=CapturedStep.run: (runs.append(steps),
                                                                                       run(self, steps)))
    decoder = T3Decoder(tiny_tts.t3, TOP + ("captured_graph", "multi_step_graph"))
    torch.manual_seed(4)
    free = decoder.generate(tiny_tts.conds.t3, text_tokens, 40, stop_on_eos=False).tokens
    stop = int(free[0, 5])  # declared the stop token: found at the check after 16 tokens
    hp = tiny_tts.t3.hp
    original, hp.stop_speech_token = hp.stop_speech_token, stop
    try:
        torch.manual_seed(4)
        runs.clear()
        result = decoder.generate(tiny_tts.conds.t3, text_tokens, 40)
    finally:
        hp.stop_speech_token = original
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(result.tokens, free[:, :first + 1]) and result.steps_run == 16
    assert runs == [15, 16]  # the second run was queued before the first check's answer came


def test_a_captured_runs_first_call_leaves_that_run_captured_for_the_next_decode(monkeypatch):
    """The first run warms up with one eager step and replays a graph one step short; the full run's
    graph is captured then too, so a decode after the first captures nothing on its clock."""
    import contextlib
    from unittest import mock

    from chatterbox_lab.decode import compiled_step

    recording, replayed, eager = [], [], []

    class Graph:
        steps = 0

        def replay(self):
            replayed.append(self.steps)

    @contextlib.contextmanager
    def capture(graph, pool=None):
        recording.append(graph)
        yield
        recording.pop()

    def step():
        if recording:
            recording[-1].steps += 1
        else:
            eager.append(1)

    monkeypatch.setattr(compiled_step.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(compiled_step.torch.cuda, "graph", capture)
    monkeypatch.setattr(compiled_step.torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(compiled_step.torch.cuda, "current_stream", mock.Mock)
    monkeypatch.setattr(compiled_step, "warmup_stream", mock.Mock)
    runs = compiled_step.CapturedStep(step, "cpu", runs=True)
    runs.on_gpu = True  # the graph machinery is stood in for above
    runs.run(15)
    assert eager == [1] and sorted(runs.graphs) == [14, 15] and replayed == [14]
    runs.run(16)
    runs.run(15)
    assert eager == [1] and replayed == [14, 16, 15]
    assert {n: graph.steps for n, graph in runs.graphs.items()} == {14: 14, 15: 15, 16: 16}
