"""GPU behaviour, full preset: run with `pytest -m gpu` on a CUDA machine."""
import pytest

from chatterbox_lab import registry
from chatterbox_lab.measure import profiling
from chatterbox_lab.decode.compiled_step import compile_counters
from chatterbox_lab.decode.decoder import STOP_CHECK_INTERVAL, T3Decoder, text_tokens_for
from chatterbox_lab.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_tts():
    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(preset="full", device="cuda")
    tts.prepare_conditionals("data/voices/alto.wav")
    return tts


@pytest.fixture(scope="module")
def compiled(full_tts):
    decoder = T3Decoder(full_tts.t3, registry.GUIDE, max_cache_len=512)
    decoder.generate(full_tts.conds.t3, text_tokens_for(full_tts, "Warm up the compiled step."), 16)
    return decoder


def test_compiled_step_replays_cuda_graphs(full_tts, compiled):
    text_tokens = text_tokens_for(full_tts, "Count the launches of each decode step.")
    counts = profiling.per_token_counts(lambda n: compiled.generate(full_tts.conds.t3, text_tokens, n))
    assert counts["graph_launches"] == pytest.approx(1.0)
    assert counts["host_launches"] <= 6, counts  # the graph and sampling's three kernels
    assert counts["gpu_kernels"] > 100, counts


def test_no_recompile_across_speakers_texts_and_sampling(full_tts, compiled):
    from chatterbox_lab.pipeline.voices import VoiceCache

    voices = VoiceCache(full_tts)
    before = compile_counters()
    for voice, text, sampling in [("tenor", "A different speaker now.", SamplingParams()),
                                  ("alto", "Longer text changes the prompt length but not the step.",
                                   SamplingParams(temperature=0.6, cfg_weight=0.2, top_p=0.8))]:
        compiled.generate(voices.use(voice).t3, text_tokens_for(full_tts, text), 32, sampling)
    assert compile_counters() == before


def test_compiled_decode_rate(full_tts, compiled):
    text_tokens = text_tokens_for(full_tts, "Measure the decode rate of the compiled step.")
    rates = [compiled.generate(full_tts.conds.t3, text_tokens, 256).decode_tok_s for _ in range(3)]
    print("compiled decode tok/s", rates)
    assert sorted(rates)[1] > 300


def test_session_serves_callers_on_other_threads():
    """Graphs are captured and replayed on the session's own worker thread, whoever calls,
    also after the main thread has set up CUDA-graph trees for itself (as a notebook would)."""
    import threading

    import torch._inductor.cudagraph_trees  # noqa: F401  (its state now belongs to this thread)

    from chatterbox_lab.serving.session import TTSSession

    session = TTSSession(preset="full", device="cuda", max_new_tokens=64)
    session.warmup()
    before = compile_counters()
    results, errors = [], []

    def call():
        try:
            results.append(session.synthesize("From another thread.", max_new_tokens=16, seed=3).wav)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4
    assert compile_counters() == before


@pytest.fixture()
def fresh_flow():
    """A model of its own (S3Gen's steps change a model in place) and its flow's mels for the
    first n of 200 fixed tokens, with fixed noise."""
    import torch

    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(preset="full", device="cuda")
    tts.prepare_conditionals("data/voices/alto.wav")
    tokens = torch.randint(0, 6561, (200,), generator=torch.Generator().manual_seed(0)).cuda()

    def mels(n=200):
        torch.manual_seed(0)
        return tts.s3gen.flow_inference(tokens[:n], ref_dict=tts.conds.gen, finalize=True)
    return tts, tokens, mels


def test_flow_graphs_replay_the_eager_flow_and_half_precision_stays_within_tolerance(fresh_flow):
    import torch

    from chatterbox_lab.s3gen.s3gen_steps import HALF_FLOW_TOLERANCE, apply_s3gen_steps, half_flow_error

    tts, tokens, mels = fresh_flow
    eager = mels()
    error = half_flow_error(tts, tokens)
    print("float16 estimator, mel relative error (full preset)", error)
    assert error <= HALF_FLOW_TOLERANCE
    apply_s3gen_steps(tts, ["flow_graphs"])
    torch.testing.assert_close(mels(), eager, rtol=1e-3, atol=1e-3)
    mels(198)  # 4 frames fewer ((161 prompt + 198) x 2 = 718): the same 64-frame bucket, 768
    estimator = tts.s3gen.flow.decoder.estimator
    assert estimator.graphs_captured == 1
    counts = profiling.profile_run(mels)
    assert counts["graph_launches"] == 10, counts  # one per Euler step
    # Eager, the estimator alone launched ~15,000 kernels (1,492 a call); the encoder stays eager.
    assert counts["host_launches"] < 2_000, counts


def test_fused_and_compiled_estimator_replays_close_to_the_graphed_one_with_fewer_kernels(fresh_flow):
    from chatterbox_lab.s3gen.s3gen_steps import apply_s3gen_steps

    tts, _, mels = fresh_flow
    apply_s3gen_steps(tts, ["flow_graphs", "flow_half"])
    graphed = mels()
    graphed_kernels = profiling.profile_run(mels)["gpu_kernels"]
    apply_s3gen_steps(tts, ["flow_fused_projections", "flow_compiled"])
    compiled = mels()
    error = float((compiled - graphed).norm() / graphed.norm())
    compiled_kernels = profiling.profile_run(mels)["gpu_kernels"]
    print(f"flow_fused_projections + flow_compiled: mel relative error {error:.2e} from the graphed float16 estimator; "
          f"GPU kernels per flow run {graphed_kernels} -> {compiled_kernels}")
    assert error < 1e-2  # float16 sums in another order
    # q, k and v one matmul; norms, activations, residuals and masks fused. Still one kernel
    # each: the other ~240 matmuls, 56 attentions and 46 convolutions of a call.
    assert compiled_kernels < 0.8 * graphed_kernels
    mels(120)  # another bucket: captured, not recompiled
    assert tts.s3gen.flow.decoder.estimator.graphs_captured == 2


def test_compiled_hifigan_gives_the_eager_audio(fresh_flow):
    import torch

    from chatterbox_lab.s3gen.s3gen_steps import apply_s3gen_steps

    tts, _, mels = fresh_flow
    hift = tts.s3gen.mel2wav
    all_mels = [mels(), mels(37)]

    def speech(m):
        torch.manual_seed(0)  # the source's random phase and noise
        return hift.inference(speech_feat=m, cache_source=torch.zeros(1, 1, 0))[0]

    eager = [speech(m) for m in all_mels]
    eager_kernels = profiling.profile_run(lambda: speech(all_mels[0]))["gpu_kernels"]
    apply_s3gen_steps(tts, ["hifigan_compiled"])
    for m, reference in zip(all_mels, eager):
        error = float((speech(m) - reference).norm() / reference.norm())
        print(f"hifigan_compiled, {m.size(-1)} frames: waveform relative error {error:.2e}")
        assert error < 1e-3
    compiled_kernels = profiling.profile_run(lambda: speech(all_mels[0]))["gpu_kernels"]
    print(f"hifigan_compiled: GPU kernels per call {eager_kernels} -> {compiled_kernels}")
    assert compiled_kernels < eager_kernels / 2


def test_compiled_hifigan_and_the_watermark_batch_equal_lengths_like_one_at_a_time(fresh_flow, monkeypatch):
    """Random source replaced by a fixed one: each row of a batched, compiled HiFi-GAN call is the row
    vocoded alone; the batched watermark is perth's own, utterance by utterance."""
    import numpy as np
    import torch

    from chatterbox_lab.pipeline.batched_waveforms import vocode_all, watermark_all
    from chatterbox_lab.s3gen.s3gen_steps import apply_s3gen_steps

    tts, _, mels = fresh_flow
    apply_s3gen_steps(tts, ["hifigan_compiled", "watermark_on_device"])
    rows = [mels()[0], mels(37)[0], mels()[0] * 0.9]
    s3gen = tts.s3gen
    # A source without random draws (phase, noise), the same function of each row's f0.
    monkeypatch.setattr(s3gen.mel2wav.m_source, "forward", lambda f0: (torch.sin(f0.cumsum(1) * 1e-3), None, None))
    # Batched and alone run other kernels (cuDNN picks its algorithm by batch size; the compiled
    # code for one row is specialized to it) and round differently: measured on an H100,
    # 4e-8 to 9e-4 with cuDNN's default TF32 and 3e-4 without (the CPU test is exact to 1e-5).
    # The last layers exponentiate the magnitudes, which stretches rounding differences.
    for tf32 in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        together = vocode_all(s3gen, rows)
        for row, wav in zip(rows, together):
            alone = vocode_all(s3gen, [row])[0]
            error = float((wav - alone).norm() / alone.norm())
            print(f"batched compiled HiFi-GAN, {row.size(-1)} frames, TF32 {tf32}: "
                  f"relative difference from alone {error:.2e}")
            assert error < 2e-3
    wavs = [wav.float().cpu().numpy() for wav in together]
    for wav, marked in zip(wavs, watermark_all(tts.watermarker, wavs, 24_000)):
        alone = tts.watermarker.apply_watermark(wav, sample_rate=24_000)
        np.testing.assert_allclose(marked, alone, rtol=1e-3, atol=1e-4)


def test_encoder_graphs_replay_the_eager_encoder(fresh_flow):
    from chatterbox_lab.s3gen.s3gen_steps import apply_s3gen_steps

    tts, _, mels = fresh_flow
    eager = mels()
    apply_s3gen_steps(tts, ["encoder_graphs"])
    replayed = mels()
    # Not elementwise: the padded length selects other convolution and matmul kernels (cuDNN
    # convolutions run in TF32 by default), which moves single values by ~3e-3 on an H100.
    error = float((replayed - eager).norm() / eager.norm())
    print("encoder graphs: mel relative error", error)
    assert error < 1e-3
    mels(199)  # (161 prompt + 199) tokens: the same 32-token bucket as 361, 384
    assert tts.s3gen.flow.encoder.graphs_captured == 1


def test_fused_matvec_kernels_match_pytorch_on_every_call_of_the_step(full_tts):
    import torch

    from chatterbox_lab.kernels.fused_matvec import Norm, reference_matvec, step_calls, triton_matvec

    torch.manual_seed(0)
    for name, call in step_calls(full_tts.t3).items():
        n, k, gated = call["n"], call["k"], call.get("gated", False)
        new = dict(device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(2 * n if gated else n, k, **new) / k ** 0.5
        kw = dict(gated=gated, norm=Norm(torch.rand(k, **new) + 0.5, 1e-5) if call.get("norm") else None,
                  residual=torch.randn(2, 1, n, **new) if call.get("residual") else None,
                  bias=torch.randn(n, **new) if call.get("bias") else None)
        x = torch.randn(2, 1, k, **new)
        got, want = triton_matvec(x, weight, **kw).float(), reference_matvec(x, weight, **kw).float()
        error = float((got - want).norm() / want.norm())
        assert error < 5e-3, (name, error)  # a few values one bf16 step apart: sums in another order


@pytest.mark.parametrize("rows", [2, 8])
def test_staged_kernel_matches_pytorch_on_every_call(full_tts, rows):
    """The Gluon kernel, its default config and every one the tuner tries, on the layer's four calls
    and the speech head (whose 8,194 columns leave the last program two)."""
    import torch

    from chatterbox_lab.kernels import staged_matvec
    from chatterbox_lab.kernels.fused_matvec import Norm, reference_matvec, step_calls, triton_matvec

    torch.manual_seed(0)
    for name in staged_matvec.CALLS:
        call = step_calls(full_tts.t3)[name]
        n, k, gated = call["n"], call["k"], call.get("gated", False)
        new = dict(device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(2 * n if gated else n, k, **new) / k ** 0.5
        kw = dict(gated=gated, norm=Norm(torch.rand(k, **new) + 0.5, 1e-5) if call.get("norm") else None,
                  residual=torch.randn(rows, 1, n, **new) if call.get("residual") else None,
                  bias=torch.randn(n, **new) if call.get("bias") else None)
        x = torch.randn(rows, 1, k, **new)
        assert staged_matvec.kernel_applies(x, weight, gated, kw["bias"]), name
        want = reference_matvec(x, weight, **kw).float()
        triton_error = float((triton_matvec(x, weight, **kw).float() - want).norm() / want.norm())
        for config in [staged_matvec.default_config(n, k, gated), *staged_matvec.candidates(n, k, gated, rows)]:
            got = staged_matvec.gluon_matvec(x, weight, config=config, **kw).float()
            error = float((got - want).norm() / want.norm())
            assert error < max(5e-3, 2 * triton_error), (name, config, error, triton_error)


@pytest.mark.parametrize("rung", ["staged_weights", "staged_head"])
def test_staged_weights_replay_one_graph_and_keep_bf16_logits(full_tts, rung):
    import torch

    from chatterbox_lab.measure import equivalence
    from chatterbox_lab.kernels import staged_matvec
    from chatterbox_lab.registry import ladder_prefix

    text_tokens = text_tokens_for(full_tts, "The weights wait in shared memory.")
    staged = T3Decoder(full_tts.t3, ladder_prefix(rung) - {"multi_step_graph"}, max_cache_len=512)
    staged.generate(full_tts.conds.t3, text_tokens, 16)
    assert staged_matvec._carved, "the staged kernel ran without its carveout"
    # The speech head (with its bias, and 8,194 columns) is staged too, not left to the Triton kernel.
    head = full_tts.t3.speech_head
    assert ("head" in staged.forward.staged) == (rung == "staged_head")
    assert staged_matvec.kernel_applies(torch.zeros(2, 1, head.in_features, dtype=head.weight.dtype, device="cuda"),
                                        head.weight, bias=head.bias)
    counts = profiling.per_token_counts(lambda n: staged.generate(full_tts.conds.t3, text_tokens, n))
    assert counts["graph_launches"] == pytest.approx(1.0), counts

    forced = staged.generate(full_tts.conds.t3, text_tokens, 48, stop_on_eos=False).tokens
    eager = T3Decoder(full_tts.t3, ("bf16", "static_cache", "embed_cache", "fused_projections"), max_cache_len=512)
    error = equivalence.relative_error(equivalence.forced_logits(staged, full_tts.conds.t3, text_tokens, forced),
                                       equivalence.forced_logits(eager, full_tts.conds.t3, text_tokens, forced))
    print(f"{rung} logits vs PyTorch's bf16 path: relative error", error)
    assert error < equivalence.BF16_LOGIT_TOLERANCE


@pytest.mark.parametrize("kernels", [("fused_matvec",), ("fused_matvec", "fused_attention"),
                                     ("fused_matvec", "fused_attention", "persistent_layers")])
def test_kernel_steps_replay_one_graph_and_keep_bf16_logits(full_tts, kernels):
    from chatterbox_lab.measure import equivalence
    from chatterbox_lab.registry import ladder_prefix

    text_tokens = text_tokens_for(full_tts, "The fused kernels read the weights once.")
    compiled = T3Decoder(full_tts.t3, ladder_prefix(kernels[-1]), max_cache_len=512)
    compiled.generate(full_tts.conds.t3, text_tokens, 16)
    counts = profiling.per_token_counts(lambda n: compiled.generate(full_tts.conds.t3, text_tokens, n))
    assert counts["graph_launches"] == pytest.approx(1.0), counts

    forced = compiled.generate(full_tts.conds.t3, text_tokens, 48, stop_on_eos=False).tokens
    eager = ("bf16", "static_cache", "embed_cache", "fused_projections")
    logits = {extra: equivalence.forced_logits(T3Decoder(full_tts.t3, eager + extra, max_cache_len=512),
                                               full_tts.conds.t3, text_tokens, forced)
              for extra in [(), kernels]}
    error = equivalence.relative_error(logits[kernels], logits[()])
    print(f"{'+'.join(kernels)} logits vs PyTorch's bf16 path: relative error", error)
    assert error < equivalence.BF16_LOGIT_TOLERANCE


@pytest.mark.parametrize("capacity", [128, 512, 1024])
@pytest.mark.parametrize("layout", ["default", "value_shares", "both"])
def test_decode_attention_kernel_matches_pytorch_at_every_stretch(full_tts, capacity, layout):
    """The full model's heads, bf16, positions at both ends of the cache and of a block; the
    stretches' partials cross SMs through the arrival counter, which must come back to zero.
    Layouts: the default stretches of one block; one stretch in value shares of 512-slot blocks
    (two of them at 1,024 slots); two stretches in two value shares."""
    import torch

    from chatterbox_lab.kernels.decode_attention import AttentionConfig, default_config, triton_decode_attention
    from chatterbox_lab.decode.kv_cache import StaticKVCache
    from chatterbox_lab.decode.t3_forward import cached_attention, rotary_tables

    cfg = full_tts.t3.cfg
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    new = dict(device="cuda", dtype=torch.bfloat16)
    cos, sin = rotary_tables(full_tts.t3, capacity, torch.bfloat16)
    arrivals = torch.zeros(4 * heads, dtype=torch.int32, device="cuda")
    config = {"default": default_config(capacity), "value_shares": AttentionConfig(1, 4, 512, 16),
              "both": AttentionConfig(2, 2, 256, 8)}[layout]
    torch.manual_seed(capacity)
    for positions in (torch.tensor([0, 1, 63, 64]), torch.tensor([capacity // 2, capacity - 65, capacity - 2, capacity - 1])):
        positions = positions.cuda()[:, None]
        caches = [StaticKVCache(1, 4, kv_heads, capacity, head_dim, torch.bfloat16, "cuda") for _ in range(2)]
        for buffer in ("keys", "values"):
            history = torch.randn(4, kv_heads, capacity, head_dim, **new)
            for cache in caches:
                getattr(cache, buffer)[0].copy_(history)
        q = torch.randn(4, 1, heads * head_dim, **new)
        k, v = (torch.randn(4, 1, kv_heads * head_dim, **new) for _ in range(2))
        got = triton_decode_attention(q, k, v, positions, cos, sin, caches[0].keys[0], caches[0].values[0],
                                      arrivals, config).float()
        want = cached_attention(q, k, v, positions, slice(None), (cos[positions], sin[positions]), caches[1], 0,
                                caches[1].mask(positions)).float()
        error = float((got - want).norm() / want.norm())
        assert error < 1e-2, (capacity, config, positions.tolist(), error)
        # The new keys' rotary is rounded once, not after each product: a bf16 step apart at most.
        key_error = (caches[0].keys[0] - caches[1].keys[0]).float().norm() / caches[1].keys[0].float().norm()
        assert key_error < 1e-3
        assert torch.equal(caches[0].values[0], caches[1].values[0])
        assert not arrivals.any()


@pytest.mark.parametrize("capacity, rows", [(128, 4), (1024, 2)])
def test_handoff_kernel_gives_the_two_kernels_output_bit_for_bit(full_tts, capacity, rows):
    """The full model's q/k/v and heads, bf16, rows at both ends of the cache, launched as a
    programmatic dependent ahead and plain, three calls in a row: the counters come back to zero.
    Four rows over 1,024 slots would be 1,024 polling programs, more than an H100 holds of this
    kernel: refused, not launched."""
    import torch

    from chatterbox_lab.kernels.experimental import head_handoff
    from chatterbox_lab.kernels.decode_attention import default_config, triton_decode_attention
    from chatterbox_lab.kernels.fused_matvec import Norm, dependent_launch_supported, triton_matvec
    from chatterbox_lab.decode.kv_cache import StaticKVCache
    from chatterbox_lab.decode.t3_forward import rotary_tables

    cfg = full_tts.t3.cfg
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    new = dict(device="cuda", dtype=torch.bfloat16)
    cos, sin = rotary_tables(full_tts.t3, capacity, torch.bfloat16)
    torch.manual_seed(capacity)
    weight = torch.randn((heads + 2 * kv_heads) * head_dim, cfg.hidden_size, **new) / cfg.hidden_size ** 0.5
    norm = Norm(torch.rand(cfg.hidden_size, **new) + 0.5, 1e-5)
    x = torch.randn(rows, 1, cfg.hidden_size, **new)
    positions = torch.tensor([[0], [63], [capacity // 2], [capacity - 1]][-rows:], device="cuda")
    caches = [StaticKVCache(1, rows, kv_heads, capacity, head_dim, torch.bfloat16, "cuda") for _ in range(2)]
    for buffer in ("keys", "values"):
        history = torch.randn(rows, kv_heads, capacity, head_dim, **new)
        for cache in caches:
            getattr(cache, buffer)[0].copy_(history)
    arrivals = torch.zeros(rows * heads, dtype=torch.int32, device="cuda")
    ready = head_handoff.counters(1, kv_heads, "cuda")
    q, k, v = triton_matvec(x, weight, norm=norm).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim],
                                                         dim=-1)
    want = triton_decode_attention(q, k, v, positions, cos, sin, caches[1].keys[0], caches[1].values[0], arrivals,
                                   default_config(capacity))
    pdl = dependent_launch_supported("cuda")
    for launch in (dict(pdl=pdl, ahead=pdl), dict()):
        for _ in range(3):
            got = head_handoff.handoff_attention(x, weight, norm, positions, cos, sin, caches[0].keys[0],
                                                 caches[0].values[0], arrivals, ready[0], default_config(capacity).splits,
                                                 **launch)
            torch.cuda.synchronize()
            assert torch.equal(got, want), launch
            assert torch.equal(caches[0].keys[0], caches[1].keys[0]) and torch.equal(caches[0].values[0],
                                                                                     caches[1].values[0])
            assert not ready.any() and not arrivals.any()


def test_fused_sampling_and_the_captured_step_draw_pytorchs_tokens_without_recompiling(full_tts):
    """Same seed, same tokens as the in-graph PyTorch sampling, for upstream's defaults and a top-p
    cut, compiled, captured directly, or captured with dependent launches (after each kernel's wait,
    or ahead of it), with the bookkeeping in our kernels, and with q/k/v and attention as one kernel;
    one graph a token, or one a stop check's 16 tokens (whose draws continue the generator's
    sequence as step-by-step replays do), with the draw on a side branch, with the prologue folded
    into the sampling kernel; new sampling values change data only, with gate/up's weights staged
    too (whose sums in another order may move a draw: its logits are checked above)."""
    import time

    import torch

    from chatterbox_lab.registry import ladder_prefix

    text_tokens = text_tokens_for(full_tts, "Sampling runs as one kernel.")
    kernels = ladder_prefix("fused_sampling")
    step_sets = {"pytorch": kernels - {"fused_sampling"}, "kernel": kernels, "captured": ladder_prefix("captured_graph"),
                 "dependent": ladder_prefix("dependent_launch"), "ahead": ladder_prefix("launch_ahead"),
                 "bookkeeping": ladder_prefix("fused_bookkeeping"), "staged": ladder_prefix("staged_weights"),
                 "runs": ladder_prefix("multi_step_graph") - {"staged_weights"},
                 "aside": ladder_prefix("draw_aside") - {"staged_weights", "staged_head"},
                 "folded": ladder_prefix("folded_prologue") - {"staged_weights", "staged_head"},
                 "handoff": ladder_prefix("head_handoff") - {"staged_weights", "staged_head", "multi_step_graph",
                                                             "draw_aside", "folded_prologue"}}
    decoders = {name: T3Decoder(full_tts.t3, steps, max_cache_len=512) for name, steps in step_sets.items()}
    assert decoders["folded"].plan.opens_early and not decoders["aside"].plan.opens_early
    for name, decoder in decoders.items():
        start = time.perf_counter()
        decoder.generate(full_tts.conds.t3, text_tokens, 16)
        print(f"{name}: first 16 tokens, compile or capture included, {time.perf_counter() - start:.1f} s")
    for name in ("kernel", "captured", "dependent", "ahead", "bookkeeping", "staged", "runs", "aside", "folded",
                 "handoff"):
        counts = profiling.per_token_counts(lambda n: decoders[name].generate(full_tts.conds.t3, text_tokens, n))
        print(name, counts)
        per_token = 1 / STOP_CHECK_INTERVAL if name in ("runs", "aside", "folded") else 1.0
        assert counts["graph_launches"] == pytest.approx(per_token), (name, counts)
    before = compile_counters()
    for sampling in (SamplingParams(), SamplingParams(top_p=0.8, temperature=0.7, repetition_penalty=1.4)):
        tokens = {}
        for name, decoder in decoders.items():
            torch.manual_seed(7)
            tokens[name] = decoder.generate(full_tts.conds.t3, text_tokens, 64, sampling, stop_on_eos=False).tokens
        assert torch.equal(tokens["captured"], tokens["kernel"]), ("captured", sampling)
        assert torch.equal(tokens["dependent"], tokens["captured"]), ("dependent", sampling)
        assert torch.equal(tokens["ahead"], tokens["captured"]), ("ahead", sampling)
        assert torch.equal(tokens["bookkeeping"], tokens["captured"]), ("bookkeeping", sampling)
        assert torch.equal(tokens["runs"], tokens["captured"]), ("runs", sampling)
        assert torch.equal(tokens["aside"], tokens["captured"]), ("aside", sampling)
        assert torch.equal(tokens["folded"], tokens["captured"]), ("folded", sampling)
        assert torch.equal(tokens["handoff"], tokens["captured"]), ("handoff", sampling)
        same = float((tokens["kernel"] == tokens["pytorch"]).float().mean())
        print(f"{sampling}: kernel and PyTorch sampling agree on {same:.0%} of 64 tokens")
        if sampling.top_p == 1:
            assert same == 1
        else:
            # bf16 logits tie often; at the top-p cut a sort keeps part of a tie group, the kernel
            # all of it, and a different candidate set can change a draw.
            assert same >= 0.9
    assert compile_counters() == before


def test_memory_parts_add_up_to_what_is_allocated(full_tts, compiled):
    import torch

    from chatterbox_lab.measure.memory import resident_parts_mib

    parts = resident_parts_mib(full_tts, compiled)
    print("resident parts, MiB:", {name: round(value, 1) for name, value in parts.items()})
    bf16_t3 = sum(p.numel() for p in full_tts.t3.parameters()) * 2 / 2**20
    assert abs(parts["t3_weights"] - bf16_t3) < 1
    assert parts["kv_cache"] == compiled.forward.cache.nbytes() / 2**20
    assert parts["other_allocated"] >= 0
    assert parts["allocated"] == torch.cuda.memory_allocated() / 2**20


def test_captures_warm_up_on_one_stream_and_keep_no_workspace_each():
    import torch

    from chatterbox_lab.graphed_calls import GraphedCalls, warmup_stream

    weight = torch.randn(256, 256, device="cuda")
    warmup_stream()  # made (and its workspace, once used) before the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.cuda.stream(torch.cuda.Stream()):
        del_me = torch.randn(64, 256, device="cuda") @ weight
    del del_me
    torch.cuda.synchronize()
    new_stream = torch.cuda.memory_allocated() - before
    print(f"cuBLAS workspace kept for a new stream: {new_stream / 2**20:.1f} MiB")
    calls, outputs = GraphedCalls(), []
    before = torch.cuda.memory_allocated()
    for rows in (64, 128, 192):
        outputs.append(calls._run(rows, lambda x: x @ weight, dict(x=torch.randn(rows, 256, device="cuda"))))
    kept = torch.cuda.memory_allocated() - before - sum(o.numel() * o.element_size() for o in outputs)
    print(f"three captures kept {kept / 2**20:.1f} MiB besides their outputs")
    assert calls.graphs_captured == 3 and kept < max(new_stream, 2**20)


def test_prefill_graph_gives_the_eager_prefills_logits(full_tts):
    import torch

    from chatterbox_lab.measure.bench import rung_steps
    from chatterbox_lab.decode.decoder import prompt_len_for

    texts = ["The prefill, replayed from a graph.", "The prefill, replayed from a graph, again."]
    steps = rung_steps("prefill_graph", "cuda")
    eager, graphed = (T3Decoder(full_tts.t3, chosen, max_cache_len=512)
                      for chosen in (steps - {"prefill_graph"}, steps))
    lengths = []
    for text in texts:
        text_tokens = text_tokens_for(full_tts, text)
        lengths.append(prompt_len_for(full_tts.t3, text_tokens))
        with torch.inference_mode():
            reference, replayed = (d.prefill(full_tts.conds.t3, text_tokens, 100, cfg_weight=0.5).float()
                                   for d in (eager, graphed))
        error = float((replayed - reference).norm() / reference.norm())
        print(f"prefill_graph, prompt of {lengths[-1]}: logits relative error {error:.2e} from the eager prefill")
        assert error < 1e-2  # bf16 matmuls of another row count
    assert lengths[0] != lengths[1]
    assert graphed.prefill_graphs.graphs_captured == len({-(-length // 32) for length in lengths})  # one a bucket


def test_a_capture_survives_an_earlier_graph_becoming_garbage_in_a_cycle():
    """The failure `graphed_calls.capturing` prevents: with the collector running during a capture,
    collecting an unreachable earlier graph destroys it mid-capture and the capture fails."""
    import gc

    import torch

    from chatterbox_lab.graphed_calls import capturing

    x = torch.ones(4, device="cuda")
    earlier = torch.cuda.CUDAGraph()
    with capturing(earlier):
        x.add_(0)
    graph, threshold = torch.cuda.CUDAGraph(), gc.get_threshold()
    gc.set_threshold(1)  # a collection at (almost) every allocation, were the collector running
    try:
        with capturing(graph):
            cycle = [earlier]
            cycle.append(cycle)
            del earlier, cycle
            garbage = [[] for _ in range(1000)]
            y = x * 2
    finally:
        gc.set_threshold(*threshold)
    del garbage
    gc.collect()  # the earlier graph goes now, outside any capture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full((4,), 2.0, device="cuda"))
