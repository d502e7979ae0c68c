"""fused_matvec: the reference is upstream's math, the kernel is the reference, the step uses them."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from chatterbox_lab.measure import equivalence
from chatterbox_lab.kernels import fused_matvec
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.kernels.fused_matvec import KernelConfig, Norm, reference_matvec


def _mlp(dim, hidden, dtype):
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=dim, intermediate_size=hidden, hidden_act="silu", mlp_bias=False)
    return LlamaMLP(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_upstreams_norm_matmul_gate_and_residual_bit_for_bit(dtype):
    torch.manual_seed(0)
    dim, hidden = 64, 96
    norm = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    mlp = _mlp(dim, hidden, dtype)
    x = torch.randn(2, 1, dim, dtype=dtype)
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])

    act = reference_matvec(x, gate_up, norm=Norm.of(norm), gated=True)
    assert torch.equal(act, mlp.act_fn(mlp.gate_proj(norm(x))) * mlp.up_proj(norm(x)))
    out = reference_matvec(act, mlp.down_proj.weight, residual=x)
    assert torch.equal(out, x + mlp(norm(x)))


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("options", ["plain", "bias", "norm", "gated", "residual", "all"])
def test_kernel_matches_reference_under_the_interpreter(interpreted, rows, options):
    torch.manual_seed(rows)
    k, n = 80, 24  # neither a multiple of the blocks: the masks are exercised
    x = torch.randn(rows, k)
    gated = options in ("gated", "all")
    weight = torch.randn(2 * n if gated else n, k) / k ** 0.5
    kw = dict(gated=gated)
    if options == "bias":
        kw["bias"] = torch.randn(n)
    if options in ("norm", "all"):
        kw["norm"] = interpreted.Norm(torch.rand(k) + 0.5, 1e-5)
    if options in ("residual", "all"):
        kw["residual"] = torch.randn(rows, n)
    got = interpreted.triton_matvec(x, weight, config=KernelConfig(block_n=8, block_k=32, warps=4), **kw)
    torch.testing.assert_close(got, interpreted.reference_matvec(x, weight, **kw), rtol=1e-5, atol=1e-5)


def test_the_kernel_serves_only_few_rows_on_a_device_that_runs_it():
    weight = torch.randn(16, 32)
    assert not fused_matvec.kernel_applies(torch.randn(2, 1, 32), weight)  # CPU, not interpreted


def test_fused_matvec_takes_the_kernel_only_for_few_rows(interpreted):
    weight = torch.randn(16, 32)
    assert interpreted.kernel_applies(torch.randn(2, 1, 32), weight)
    assert not interpreted.kernel_applies(torch.randn(interpreted.MAX_ROWS + 1, 32), weight)


def test_decode_step_through_the_kernels_gives_upstreams_logits(interpreted, tiny_tts):
    """The whole fused step, kernels run by the interpreter, teacher-forced against upstream fp32."""
    text_tokens = text_tokens_for(tiny_tts, "Four tokens.")
    forced = equivalence.seeded_tokens(tiny_tts, text_tokens, 4, seed=1)
    reference = equivalence.reference_logits(tiny_tts, text_tokens, forced)
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache", "fused_projections", "fused_matvec"))
    got = equivalence.forced_logits(decoder, tiny_tts.conds.t3, text_tokens, forced)
    assert equivalence.relative_error(got, reference) < 1e-5
