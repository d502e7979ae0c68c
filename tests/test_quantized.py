"""The 8-bit formats: round trips within the bounds the formats give, and the many-row matmul."""
import pytest
import torch

from chatterbox_lab.kernels import quantized
from chatterbox_lab.kernels.quantized import quantize, quantize_rows, dequantize_rows, round_trip_bound


def _rows():
    torch.manual_seed(0)
    # Rows of very different ranges, one of zeros, and values far below a row's largest (fp8's
    # subnormals).
    x = torch.randn(6, 96) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 1.0, 5.0])[:, None]
    x[4, :8] = torch.tensor([1e-6, -2e-5, 3e-4, 1e-3, -1e-2, 0.1, 2.0, -3.5])
    return x


@pytest.mark.parametrize("format", quantized.FORMATS)
def test_a_round_trip_errs_by_at_most_what_the_format_allows(format):
    x = _rows()
    codes, scale = quantize_rows(x, format)
    assert codes.dtype == quantized.STORAGE[format] and scale.shape == (6,)
    back = dequantize_rows(codes, scale)
    assert torch.isfinite(back).all()
    assert ((back - x).abs() <= round_trip_bound(x, scale, format) * (1 + 1e-6)).all()
    # The row's largest magnitude lands on the format's largest code.
    assert torch.equal(codes.float().abs().amax(dim=1)[scale != 1], torch.full((5,), quantized.LARGEST[format]))
    assert not codes[3].float().any() and scale[3] == 1  # zeros, no division by zero


def test_int8_rounds_ties_to_even_as_torch_round_does():
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 3.3, -3.7])
    assert torch.equal(quantized.rounded(ties), torch.round(ties))


def test_a_quantized_weight_is_per_output_row_and_dequantizes_to_the_models_dtype():
    weight = torch.randn(8, 32, dtype=torch.bfloat16)
    q = quantize(weight, "int8")
    assert q.shape == (8, 32) and q.scale.shape == (8,) and q.nbytes() == 8 * 32 + 8 * 4
    assert q.dequantized().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="choose from int8, fp8"):
        quantize(weight, "int4")
    with pytest.raises(ValueError, match="weight matrix"):
        quantize(weight[0], "int8")


@pytest.mark.parametrize("format", quantized.FORMATS)
def test_the_many_row_matmul_is_pytorchs_on_the_dequantized_weight(format):
    torch.manual_seed(1)
    weight, bias = torch.randn(24, 64), torch.randn(24)
    x = torch.randn(3, 20, 64)
    q = quantize(weight, format)
    got = quantized.quantized_linear(x, q, bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, q.dequantized(), bias))


@pytest.mark.gpu
def test_cublas_fp8_matmul_is_near_the_dequantized_one():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("fp8 matmuls need a Hopper or later GPU")
    torch.manual_seed(2)
    weight = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    q = quantize(weight, "fp8")
    assert quantized.scaled_mm_applies(x, q)
    want = torch.nn.functional.linear(x.float(), q.dequantized().float())
    got = quantized.quantized_linear(x, q).float()
    # The input rows are rounded to fp8 too: about 2^-4 of each value, averaged down over 1,024 sums.
    assert ((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("format", quantized.FORMATS)
@pytest.mark.parametrize("options", ["bias", "norm_gated", "residual"])
def test_the_matvec_kernel_on_8_bit_rows_is_pytorch_on_the_dequantized_rows(interpreted, format, options):
    """Under Triton's interpreter: the kernel widens the codes and scales the sums; PyTorch multiplies
    the dequantized weight. In fp32 they differ only by the order of the sums."""
    torch.manual_seed(3)
    rows, k, n = 2, 80, 24  # neither a multiple of the blocks: the masks are exercised
    gated = options == "norm_gated"
    q = quantize(torch.randn(2 * n if gated else n, k) / k ** 0.5, format)
    x = torch.randn(rows, 1, k)
    kw = dict(gated=gated)
    if options == "bias":
        kw["bias"] = torch.randn(n)
    if gated:
        kw["norm"] = interpreted.Norm(torch.rand(k) + 0.5, 1e-5)
    if options == "residual":
        kw["residual"] = torch.randn(rows, 1, n)
    config = interpreted.KernelConfig(block_n=8, block_k=32, warps=4)
    got = interpreted.fused_matvec(x, q, config=config, **kw)
    torch.testing.assert_close(got, interpreted.reference_matvec(x, q.dequantized(), **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("format", quantized.FORMATS)
@pytest.mark.parametrize("gated", [False, True])
def test_the_matvec_kernel_on_8_bit_rows_on_the_gpu(format, gated):
    """The full model's gate/up and down shapes in bf16, against PyTorch on the dequantized rows."""
    from chatterbox_lab.kernels import fused_matvec

    if format == "fp8" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("fp8 weights need a Hopper or later GPU")
    torch.manual_seed(4)
    k, n = (1024, 4096) if gated else (4096, 1024)
    q = quantize(torch.randn(2 * n if gated else n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5, format)
    x = torch.randn(2, 1, k, device="cuda", dtype=torch.bfloat16)
    kw = dict(gated=True, norm=fused_matvec.Norm(torch.ones(k, device="cuda", dtype=torch.bfloat16), 1e-5)) \
        if gated else dict(residual=torch.randn(2, 1, n, device="cuda", dtype=torch.bfloat16))
    got = fused_matvec.triton_matvec(x, q, **kw).float()
    want = fused_matvec.reference_matvec(x.float(), q.dequantized().float(),
                                         **{key: (v.float() if torch.is_tensor(v) else v) for key, v in kw.items()})
    # bf16 output rounding (2^-9 relative) on both sides; the kernel never rounds a dequantized weight.
    assert ((got - want).norm() / want.norm()) < 1e-2


def test_an_int8_cache_stores_codes_and_reads_back_within_half_a_step():
    from chatterbox_lab.decode.kv_cache import StaticKVCache

    torch.manual_seed(5)
    cache = StaticKVCache(1, 2, 2, 16, 8, torch.float32, "cpu", format="int8")
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    keys, values = cache.update(0, torch.arange(5), k, v)
    assert cache.keys[0].dtype == torch.int8 and keys.dtype == torch.float32
    for new, read, scales in ((k, keys, cache.key_scales[0]), (v, values, cache.value_scales[0])):
        assert ((read[:, :, :5] - new).abs() <= quantized.INT8_HALF_STEP * scales[:, :, :5, None] * (1 + 1e-6)).all()
    one = torch.randn(2, 2, 1, 8)
    keys, _ = cache.update(0, torch.tensor([[7], [9]]), one, one)  # one step, a position per row
    assert (keys[0, :, 7] - one[0, :, 0]).abs().max() <= cache.key_scales[0][0, :, 7].max()
    # Half the bytes, and a scale per slot and head.
    assert cache.nbytes() == 2 * (2 * 2 * 16 * 8 + 4 * 2 * 2 * 16)
    with pytest.raises(ValueError, match="choose from model, int8"):
        StaticKVCache(1, 2, 2, 16, 8, torch.float32, "cpu", format="fp4")


def test_an_int8_cache_refuses_scales_of_the_wrong_shape(interpreted):
    from chatterbox_lab.kernels import decode_attention
    from chatterbox_lab.kernels.decode_attention import AttentionConfig

    one = torch.zeros(1, 1, 32)
    codes = torch.zeros(1, 1, 8, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="fp32 scale per"):
        decode_attention.triton_decode_attention(
            one, one, one, torch.zeros(1, dtype=torch.long), torch.zeros(8, 32), torch.zeros(8, 32), codes, codes,
            torch.zeros(1, dtype=torch.int32), AttentionConfig(1, 1, 64, 4), scales=(torch.ones(1, 1, 4),) * 2)


def test_8_bit_formats_resolve_into_the_plans_weights_and_cache_fields():
    from chatterbox_lab import registry
    from chatterbox_lab.decode.plan import DecodePlan

    hopper = registry.preset("recommended", "hopper")
    int8 = DecodePlan.resolve(set(hopper) | {"int8_weights"})
    assert int8.weights == "int8" and int8.staged == () and int8.layer == "separate" and int8.cache_format == "model"
    assert DecodePlan.resolve(set(hopper) | {"int8_weights", "fp8_weights"}).weights == "fp8"
    cache = DecodePlan.resolve(set(hopper) | {"int8_kv_cache", "persistent_layers"})
    assert cache.cache_format == "int8" and cache.layer == "separate" and cache.weights == "bf16"
    assert DecodePlan.resolve(hopper).staged == ("gate_up", "head")


def test_matvec_picks_are_kept_per_weight_format():
    from chatterbox_lab.kernels.fused_matvec import KernelConfig, default_config
    from chatterbox_lab.kernels.picks import KernelPicks

    picks = KernelPicks().with_pick("gate_up", KernelConfig(8, 1024, 4)).with_pick("gate_up_int8",
                                                                                   KernelConfig(16, 1024, 8))
    assert picks.matvec("gate_up", 2, 4096, 1024, True) == KernelConfig(8, 1024, 4)
    assert picks.matvec("gate_up", 2, 4096, 1024, True, format="int8") == KernelConfig(16, 1024, 8)
    assert picks.matvec("gate_up", 2, 4096, 1024, True, format="fp8") == default_config(4096, 1024, True)
    assert KernelPicks.from_json(picks.to_json()) == picks


def test_the_8_bit_floor_counts_one_byte_a_matvec_weight_and_its_scales(tiny_tts):
    from chatterbox_lab.measure import roofline

    t3 = tiny_tts.t3
    linears = [m for part in (t3.tfmr.layers, t3.speech_head) for m in part.modules()
               if isinstance(m, torch.nn.Linear)]
    eight_bit = roofline.weight_bytes_per_step(t3, "int8")
    assert roofline.weight_bytes_per_step(t3) - eight_bit == sum(
        m.weight.numel() * (m.weight.element_size() - 1) - 4 * m.weight.size(0) for m in linears)
    head_dim = t3.cfg.hidden_size // t3.cfg.num_attention_heads
    ratio = roofline.kv_bytes_per_step(t3, 100, cache_format="int8") / roofline.kv_bytes_per_step(t3, 100)
    assert ratio == pytest.approx((1 + 4 / head_dim) / t3.speech_head.weight.element_size())
    floors = [roofline.floor(t3, 1e12, 50, 32, **formats)["floor_tok_s"]
              for formats in ({}, dict(weights_format="int8", cache_format="int8"))]
    assert floors[1] > floors[0]


def test_torchao_rungs_say_how_to_get_torchao_where_it_is_missing():
    from chatterbox_lab.measure import torchao_baseline

    reason = torchao_baseline.missing_reason("torchao_int8", "cpu")
    try:
        import torchao  # noqa: F401
    except ImportError:
        assert f"pip install torchao=={torchao_baseline.VERSION}" in reason
    else:
        assert "needs a CUDA GPU" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("splits, parts", [(8, 1), (2, 4)])
def test_the_attention_kernel_on_an_int8_cache_on_the_gpu(splits, parts):
    """The full model's heads in bf16: the kernel against SDPA over the dequantized int8 cache. The
    new slot's codes may differ by one step where the kernel's rotary rounds k differently."""
    from chatterbox_lab.decode.t3_forward import cached_attention
    from chatterbox_lab.kernels import decode_attention
    from chatterbox_lab.kernels.decode_attention import AttentionConfig

    torch.manual_seed(7)
    rows, heads, kv_heads, head_dim, capacity = 2, 16, 16, 64, 512
    cos, sin = (torch.randn(capacity, head_dim // 2, device="cuda").repeat(1, 2).bfloat16() for _ in range(2))
    positions = torch.tensor([300], device="cuda")
    q, k, v = (torch.randn(rows, 1, n * head_dim, device="cuda", dtype=torch.bfloat16) for n in (heads, kv_heads,
                                                                                                 kv_heads))
    from chatterbox_lab.decode.kv_cache import StaticKVCache

    caches = [StaticKVCache(1, rows, kv_heads, capacity, head_dim, torch.bfloat16, "cuda", format="int8")
              for _ in range(2)]
    history = [torch.randn(rows, kv_heads, capacity, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for cache in caches:
        cache.update(0, torch.arange(capacity, device="cuda"), *history)
    arrivals = torch.zeros(rows * heads, dtype=torch.int32, device="cuda")
    got = decode_attention.triton_decode_attention(q, k, v, positions, cos, sin, caches[0].keys[0],
                                                   caches[0].values[0], arrivals,
                                                   AttentionConfig(splits, parts, 64, 4), scales=caches[0].scales(0))
    want = cached_attention(q, k, v, positions, slice(None), (cos[positions][None], sin[positions][None]), caches[1], 0,
                            caches[1].mask(positions))
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
    for name in ("keys", "values"):
        assert (getattr(caches[0], name)[0].int() - getattr(caches[1], name)[0].int()).abs().max() <= 1, name
    torch.testing.assert_close(caches[0].key_scales[0], caches[1].key_scales[0], rtol=1e-2, atol=0)
    assert not arrivals.any()


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["int8_weights", "fp8_weights", "int8_kv_cache"])
def test_the_8_bit_steps_capture_one_graph_and_stay_near_bf16(step):
    """The full synthetic model's recommended set with each 8-bit step: the step captures and replays,
    and its teacher-forced logits stay within the step's tolerance of the bf16 path's."""
    from chatterbox_lab import registry
    from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
    from chatterbox_lab.decode.plan import device_kind, unsupported_steps
    from chatterbox_lab.loading.models import load_tts
    from chatterbox_lab.measure import equivalence, quality

    if step in unsupported_steps("cuda"):
        pytest.skip(f"{step} needs a Hopper or later GPU")
    tts = load_tts(device="cuda")
    tts.prepare_conditionals(str(__import__("chatterbox_lab").voice_path("alto")))
    text_tokens = text_tokens_for(tts, "Eight bits a weight, measured.")
    recommended = frozenset(registry.preset("recommended", device_kind("cuda"))) - {"multi_step_graph"}
    eight_bit = T3Decoder(tts.t3, quality.with_step(recommended, step), max_cache_len=512)
    forced = eight_bit.generate(tts.conds.t3, text_tokens, 48, stop_on_eos=False).tokens
    bf16 = T3Decoder(tts.t3, recommended, max_cache_len=512)
    error = equivalence.relative_error(equivalence.forced_logits(eight_bit, tts.conds.t3, text_tokens, forced),
                                       equivalence.forced_logits(bf16, tts.conds.t3, text_tokens, forced))
    print(f"{step}: teacher-forced logits against bf16's, relative error {error:.4f}")
    assert error < quality.LOGIT_TOLERANCE[step]


@pytest.mark.parametrize("format", quantized.FORMATS)
def test_the_dequantizing_matmul_is_pytorch_on_the_dequantized_weight(interpreted, format):
    """Under the interpreter, with tiles that do not divide the shape: many rows at one byte a weight."""
    torch.manual_seed(8)
    q = quantize(torch.randn(72, 80) / 9, format)
    x, bias = torch.randn(3, 23, 80), torch.randn(72)
    got = quantized.triton_quantized_linear(x, q, bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, q.dequantized(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("format", quantized.FORMATS)
def test_the_dequantizing_matmul_on_the_gpu(format):
    torch.manual_seed(9)
    q = quantize(torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) / 32, format)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), q.dequantized().float())
    got = quantized.triton_quantized_linear(x, q).float()
    assert ((got - want).norm() / want.norm()) < 1e-2
