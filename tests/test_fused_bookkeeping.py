"""fused_bookkeeping: the prologue kernel and the sampling kernel's token write (and, folded, the prologue's
work for the step after) keep the decoder's state."""
import pytest
import torch

from chatterbox_lab.kernels import fused_bookkeeping, fused_sampling
from chatterbox_lab.sampling import DeviceSampling, SamplingParams, race_noise

VOCAB, DIM, POSITIONS = 50, 16, 40


def _state(streams: int, step: int):
    torch.manual_seed(streams)
    tokens = torch.randint(0, VOCAB, (streams, POSITIONS))
    seen = torch.rand(streams, VOCAB) < 0.1
    return tokens, torch.tensor([step]), seen, torch.randint(3, 20, (streams,))


@pytest.mark.parametrize("streams", [1, 3])
def test_prologue_writes_what_the_pytorch_bookkeeping_computes(interpreted, streams):
    tokens, step_index, seen, prompt_len = _state(streams, step=7)
    token_table, position_table = torch.randn(VOCAB, DIM), torch.randn(POSITIONS, DIM)
    want_seen = seen.clone().scatter_(1, tokens.index_select(1, step_index), True)
    want_embeds = (token_table[tokens[:, 7]] + position_table[8]).repeat_interleave(2, dim=0)[:, None]
    want_positions = prompt_len + 7
    want_positions = want_positions if streams == 1 else want_positions.repeat_interleave(2)[:, None]

    buffers = fused_bookkeeping.StepBuffers(streams, DIM, VOCAB, torch.float32, "cpu")
    sources = fused_bookkeeping.InputSources(prompt_len, token_table, position_table, buffers)
    embeds, positions = fused_bookkeeping.prologue(tokens, step_index, seen, sources)
    assert torch.equal(seen, want_seen)
    assert torch.equal(embeds, want_embeds) and torch.equal(positions, want_positions)
    assert int(step_index) == 7  # the sampling kernel advances it


def test_prologue_refuses_tables_it_cannot_address():
    prompt_len = _state(1, step=0)[3]
    buffers = fused_bookkeeping.StepBuffers(1, 12, VOCAB, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dim must be a power of two, got 12"):
        fused_bookkeeping.InputSources(prompt_len, torch.randn(VOCAB, 12), torch.randn(POSITIONS, 12), buffers)
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_bookkeeping.InputSources(prompt_len, torch.randn(DIM, VOCAB).t(), torch.randn(POSITIONS, DIM), buffers)


@pytest.mark.parametrize("streams", [1, 3])
def test_sampling_kernel_writes_the_token_after_the_counter_and_advances_it(interpreted, streams):
    tokens, step_index, seen, _ = _state(streams, step=4)
    sampling = DeviceSampling("cpu")
    sampling.set(SamplingParams())
    logits = torch.randn(2 * streams, VOCAB) * 3
    noise = race_noise(seen)
    nonfinite = torch.zeros((), dtype=torch.bool)
    want = tokens.clone()
    want[:, 5:6] = fused_sampling.triton_sample(logits, seen, sampling, noise, nonfinite)

    arrivals = torch.zeros(1, dtype=torch.int32)
    assert fused_sampling.triton_sample(logits, seen, sampling, noise, nonfinite,
                                        write_token=(tokens, step_index, arrivals)) is None
    assert torch.equal(tokens, want)
    assert int(step_index) == 5 and int(arrivals) == 0


@pytest.mark.parametrize("streams", [1, 3])
def test_sampling_kernel_with_the_folded_prologue_writes_the_next_steps_input(interpreted, streams):
    """The kernel's token write, then the prologue of the step after, against the two kernels apart."""
    tokens, step_index, seen, prompt_len = _state(streams, step=4)
    token_table, position_table = torch.randn(VOCAB, DIM), torch.randn(POSITIONS, DIM)
    sampling = DeviceSampling("cpu")
    sampling.set(SamplingParams())
    logits = torch.randn(2 * streams, VOCAB) * 3
    noise = race_noise(seen)
    nonfinite = torch.zeros((), dtype=torch.bool)
    arrivals = torch.zeros(1, dtype=torch.int32)

    def state_after(fold: bool):
        state = [t.clone() for t in (tokens, step_index, seen)]
        sources = fused_bookkeeping.InputSources(prompt_len, token_table, position_table,
                                                 fused_bookkeeping.StepBuffers(streams, DIM, VOCAB, torch.float32,
                                                                               "cpu"))
        fused_sampling.triton_sample(logits, state[2], sampling, noise, nonfinite, write_token=(*state[:2], arrivals),
                                     next_input=sources if fold else None)
        if not fold:
            fused_bookkeeping.prologue(*state, sources)
        return state + [sources.out.embeds, sources.out.positions]

    for got, want in zip(state_after(fold=True), state_after(fold=False)):
        assert torch.equal(got, want)
    assert int(arrivals) == 0


def test_the_folded_prologue_needs_the_token_write():
    tokens, step_index, seen, prompt_len = _state(1, step=0)
    sources = fused_bookkeeping.InputSources(prompt_len, torch.randn(VOCAB, DIM), torch.randn(POSITIONS, DIM),
                                             fused_bookkeeping.StepBuffers(1, DIM, VOCAB, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="pass write_token too"):
        fused_sampling.triton_sample(torch.randn(2, VOCAB), seen, DeviceSampling("cpu"), race_noise(seen),
                                     torch.zeros((), dtype=torch.bool), next_input=sources)
