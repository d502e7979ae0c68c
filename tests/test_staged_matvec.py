"""staged_matvec on the CPU: its configs, the carveout it asks for, and its fallback to fused_matvec.
The Gluon kernel itself runs on GPUs only (tests in test_gpu.py)."""
from types import SimpleNamespace

import pytest
import torch

from chatterbox_lab import registry
from chatterbox_lab.tuning import chain_tuning
from chatterbox_lab.kernels import decode_attention, fused_matvec, staged_matvec
from chatterbox_lab.measure import equivalence
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.kernels.fused_matvec import Norm, step_calls
from chatterbox_lab.kernels.picks import KernelPicks, name_of
from chatterbox_lab.kernels.staged_matvec import StagedConfig

# The full model's layer calls and speech head: (n, k, gated).
FULL_CALLS = {"qkv": (3072, 1024, False), "o_proj": (1024, 1024, False), "gate_up": (4096, 1024, True),
              "down": (1024, 4096, False), "head": (8194, 1024, False)}
H100 = SimpleNamespace(multi_processor_count=132, shared_memory_per_multiprocessor=228 * 1024)


@pytest.mark.parametrize("name", list(FULL_CALLS))
def test_defaults_and_candidates_give_every_thread_its_own_work_within_shared_memory(name):
    n, k, gated = FULL_CALLS[name]
    found = staged_matvec.candidates(n, k, gated)
    assert found and len(set(found)) == len(found)
    for config in [staged_matvec.default_config(n, k, gated), *found]:
        assert config.fits(n, k), config
        assert staged_matvec.shared_bytes(2, k, config, gated) <= 227 * 1024
        assert config.warps_n * (config.warps // config.warps_n) == config.warps


def test_gate_up_defaults_to_two_programs_an_sm_of_an_h100():
    config = staged_matvec.default_config(*FULL_CALLS["gate_up"])
    assert config == StagedConfig(block_n=16, chunk_k=256, lanes_n=4, warps_n=4, warps=4)
    assert 4096 // config.block_n == 256


def test_a_config_whose_threads_would_repeat_work_does_not_fit():
    assert not StagedConfig(block_n=8, chunk_k=256, lanes_n=4, warps_n=4, warps=4).fits(4096, 1024)  # 16 > 8 columns
    assert not StagedConfig(block_n=16, chunk_k=64, lanes_n=4, warps_n=2, warps=4).fits(4096, 1024)  # 2 warps on k
    assert not StagedConfig(block_n=16, chunk_k=256, lanes_n=4, warps_n=4, warps=4).fits(8, 1024)  # no columns left


def test_the_speech_head_stages_in_programs_whose_last_one_has_two_columns():
    config = staged_matvec.default_config(*FULL_CALLS["head"])
    assert config.block_n == 32 and config.fits(8194, 1024)
    assert -(-8194 // config.block_n) == 257 and 8194 % config.block_n == 2


def test_the_carveout_holds_an_sms_share_of_the_programs_and_no_more():
    # 256 programs of 68 KiB on 132 SMs: two an SM, 136 KiB of 228.
    assert staged_matvec.carveout_percent(256, 68 * 1024, H100) == 60
    assert staged_matvec.carveout_percent(128, 68 * 1024, H100) == 30
    assert staged_matvec.carveout_percent(1024, 68 * 1024, H100) == 100


def test_off_the_gpu_the_staged_call_is_fused_matvecs():
    torch.manual_seed(0)
    n, k = 64, 32
    x, weight = torch.randn(2, 1, k), torch.randn(2 * n, k)
    norm = Norm(torch.rand(k) + 0.5, 1e-5)
    assert not staged_matvec.kernel_applies(x, weight, gated=True)
    got = staged_matvec.staged_matvec(x, weight, norm=norm, gated=True)
    assert torch.equal(got, fused_matvec.reference_matvec(x, weight, norm=norm, gated=True))


def test_the_plan_stages_only_known_matvecs_and_only_with_the_matvec_kernels():
    with pytest.raises(ValueError, match="'staged_weights' needs launch_ahead"):
        DecodePlan.resolve({"static_cache", "fused_projections", "staged_weights"})
    for last in ("staged_weights", "staged_head"):
        plan = DecodePlan.resolve(registry.ladder_prefix(last) - {"bf16"})
        assert plan.matmuls == "matvec" and set(plan.staged) <= set(staged_matvec.CALLS)
    assert DecodePlan.resolve(registry.ladder_prefix("staged_head")).staged == ("gate_up", "head")


def test_the_step_stages_gate_up_and_gives_the_same_tokens_off_the_gpu(tiny_tts):
    text_tokens = text_tokens_for(tiny_tts, "Staged or not, the same tokens.")
    steps = registry.ladder_prefix("staged_weights") - {"bf16"}
    staged, plain = T3Decoder(tiny_tts.t3, steps), T3Decoder(tiny_tts.t3, steps - {"staged_weights"})
    assert staged.forward.staged == {"gate_up"} and plain.forward.staged == frozenset()
    want = equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 3, plain)
    assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 3, staged), want)


def test_the_staged_head_step_stages_the_head_as_well_and_the_draw_aside_changes_nothing_off_the_gpu(tiny_tts):
    text_tokens = text_tokens_for(tiny_tts, "The head waits in shared memory too.")
    steps = registry.ladder_prefix("draw_aside") - {"bf16"}
    both, plain = T3Decoder(tiny_tts.t3, steps), T3Decoder(tiny_tts.t3, steps - {"staged_head", "draw_aside"})
    assert both.forward.staged == {"gate_up", "head"} and both.draw_stream is None
    want = equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 3, plain)
    assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 12, 3, both), want)


def test_the_tuner_tunes_a_staged_calls_config_and_leaves_the_triton_kernel_its_default(tiny_tts, monkeypatch):
    decoder = T3Decoder(tiny_tts.t3, registry.ladder_prefix("staged_weights") - {"bf16"}, max_new_tokens=4,
                        max_cache_len=256)
    calls = step_calls(decoder.t3)
    gate_up = (2, calls["gate_up"]["n"], calls["gate_up"]["k"], True)
    best = staged_matvec.candidates(*gate_up[1:])[-1]
    # A plain kernel's pick for gate/up, as a sweep may leave it: the staged call runs its own default.
    decoder.forward.picks = KernelPicks().with_pick("gate_up", fused_matvec.KernelConfig(1, 128, 4))
    assert decoder.picks.staged("gate_up", *gate_up) == staged_matvec.default_config(*gate_up[1:])
    monkeypatch.setattr(chain_tuning, "ORDER", ("gate_up",))
    attention = decode_attention.default_config(decoder.capacity)
    monkeypatch.setattr(chain_tuning, "attention_candidates", lambda capacity, head_dim: [attention])

    def decode():
        return 100.0 + (decoder.picks.staged("gate_up", *gate_up) == best)

    found = chain_tuning.tune(decoder, decode, repeats=1, ab_rounds=1, final_rounds=1)
    assert found["calls"]["gate_up"]["best"] == name_of(best)
    assert decoder.picks.staged("gate_up", *gate_up) == best
    assert decoder.picks.matvec("gate_up", *gate_up) == fused_matvec.default_config(*gate_up[1:])


def test_the_rungs_leave_the_step_out_where_gluon_is_missing(monkeypatch):
    """A CUDA device (only named here: the support checks are stood in for) with dependent launch
    but without Gluon's shared-memory copies."""
    from chatterbox_lab.decode import plan
    from chatterbox_lab.measure import bench

    monkeypatch.setattr(fused_matvec, "dependent_launch_supported", lambda device: True)
    monkeypatch.setattr(staged_matvec, "supported", lambda device: False)
    monkeypatch.setattr(bench, "resolve_device", lambda device: device)
    staged = {"staged_weights", "staged_head"}
    assert plan.device_kind("cuda") == "cuda"
    # fp8 weights are left out with them: the plan takes such a card for one before Hopper.
    assert plan.unsupported_steps("cuda") == staged | {"fp8_weights"}
    assert not bench.rung_steps("staged_head", "cuda") & staged
    assert "launch_ahead" in bench.rung_steps("staged_head", "cuda")
    experimental = {step for step in registry.T3_STEPS if registry.STEPS[step].status == "experimental"}
    assert bench.rung_steps("prefill_graph", "cuda") == registry.ladder_prefix("prefill_graph") - staged - experimental
