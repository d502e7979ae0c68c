"""fused_sampling: the kernel picks the token PyTorch's sampling picks with the same random draws."""
import pytest
import torch

from chatterbox_lab.kernels import fused_sampling
from chatterbox_lab.sampling import DeviceSampling, SamplingParams, next_token_probs, sample_token

VOCAB = 1000  # not a power of two: the padded lanes are exercised

CASES = {
    "upstream defaults": SamplingParams(),
    "top-p 0.9": SamplingParams(top_p=0.9),
    "top-p 0.5, no min-p": SamplingParams(top_p=0.5, min_p=0.0),
    "greedy": SamplingParams(top_p=1e-6),
    "strong penalty, no CFG": SamplingParams(repetition_penalty=2.0, cfg_weight=0.0, temperature=1.3),
}


def _check_tokens(sampling_params: SamplingParams, vocab: int, seeds) -> None:
    sampling = DeviceSampling("cpu")
    sampling.set(sampling_params)
    for seed in seeds:
        torch.manual_seed(seed)
        utterances = 3
        # Peaked like a trained model's logits, so min-p and top-p both have work to do.
        logits = torch.randn(2 * utterances, vocab) * 3
        seen = torch.rand(utterances, vocab) < 0.05
        nonfinite = torch.zeros((), dtype=torch.bool)
        state = torch.get_rng_state()
        want = sample_token(next_token_probs(logits, seen, sampling))
        torch.set_rng_state(state)
        noise = torch.empty(utterances, vocab).exponential_(1)
        got = fused_sampling.triton_sample(logits, seen, sampling, noise, nonfinite)
        assert torch.equal(got, want), (sampling_params, vocab, seed)
        assert not nonfinite


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_picks_pytorchs_tokens_for_the_same_noise(interpreted, case):
    _check_tokens(CASES[case], VOCAB, range(8))


@pytest.mark.parametrize("vocab, block, tail", [(8194, 8192, 2), (1024, 1024, 0), (1000, 1024, 0), (519, 512, 7)])
def test_the_vocabulary_is_a_power_of_two_block_and_a_few_tokens_past_it(interpreted, vocab, block, tail):
    """T3's 8,194 speech tokens: 8,192 and 2 scalars, not one block of 16,384, half of it masked."""
    assert fused_sampling.blocks(vocab) == (block, tail)
    for case in ("upstream defaults", "top-p 0.5, no min-p"):
        _check_tokens(CASES[case], vocab, range(3))


def test_a_tail_token_is_drawn_and_cut_like_any_other(interpreted):
    """Probabilities 1/7, 2/7 and 4/7, the most likely past a block of 2: top-p 0.65 and min-p 0.3
    each keep it and the next, a greedy top-p it alone."""
    sampling = DeviceSampling("cpu")
    logits = torch.tensor([1.0, 2.0, 4.0]).log().repeat(2, 1)
    assert fused_sampling.blocks(3) == (2, 1)
    for params, want in [(SamplingParams(top_p=0.65, min_p=0.0), {1, 2}), (SamplingParams(min_p=0.3), {1, 2}),
                         (SamplingParams(top_p=1e-6, min_p=0.0), {2})]:
        sampling.set(SamplingParams(**{**vars(params), "temperature": 1.0, "cfg_weight": 0.0}))
        nothing_seen, flag = torch.zeros(1, 3, dtype=torch.bool), torch.zeros((), dtype=torch.bool)
        picked = {int(fused_sampling.triton_sample(logits, nothing_seen, sampling, torch.empty(1, 3).exponential_(1),
                                                   flag)) for _ in range(200)}
        assert picked == want, params


def test_top_p_keeps_the_smallest_set_over_the_mass(interpreted):
    """Probabilities 0.4, 0.3, 0.2, 0.1: top-p 0.65 keeps the first two, and a draw never leaves them."""
    sampling = DeviceSampling("cpu")
    sampling.set(SamplingParams(top_p=0.65, min_p=0.0, temperature=1.0, cfg_weight=0.0))
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().repeat(2, 1)
    picked = {int(fused_sampling.triton_sample(logits, torch.zeros(1, 4, dtype=torch.bool), sampling,
                                               torch.empty(1, 4).exponential_(1), torch.zeros((), dtype=torch.bool)))
              for _ in range(200)}
    assert picked == {0, 1}


def test_non_finite_logits_raise_the_flag(interpreted):
    sampling = DeviceSampling("cpu")
    sampling.set(SamplingParams())
    logits = torch.randn(2, VOCAB)
    logits[0, 5] = float("nan")
    nonfinite = torch.zeros((), dtype=torch.bool)
    fused_sampling.triton_sample(logits, torch.zeros(1, VOCAB, dtype=torch.bool), sampling,
                                 torch.ones(1, VOCAB), nonfinite)
    assert nonfinite


def test_shapes_are_checked():
    sampling = DeviceSampling("cpu")
    with pytest.raises(ValueError, match=r"expected logits \(2n, V\)"):
        fused_sampling.triton_sample(torch.zeros(3, 8), torch.zeros(2, 8, dtype=torch.bool), sampling,
                                     torch.ones(2, 8), torch.zeros((), dtype=torch.bool))


def test_each_utterance_may_bring_its_own_sampling_values(interpreted):
    """Requests decoded together keep their own values: the kernel reads each utterance's set and
    picks the tokens PyTorch's path picks with per-utterance values and the same noise."""
    rows = list(CASES.values())
    sampling = DeviceSampling("cpu", rows=len(rows))
    sampling.set(rows)
    for seed in range(4):
        torch.manual_seed(seed)
        logits = torch.randn(2 * len(rows), VOCAB) * 3
        seen = torch.rand(len(rows), VOCAB) < 0.05
        noise = torch.empty(len(rows), VOCAB).exponential_(1)
        want = torch.argmax(next_token_probs(logits, seen, sampling) / noise, dim=-1, keepdim=True)
        got = fused_sampling.triton_sample(logits, seen, sampling, noise, torch.zeros((), dtype=torch.bool))
        assert torch.equal(got, want), seed


def test_per_utterance_values_give_each_row_the_probabilities_it_gets_alone():
    rows = list(CASES.values())
    batched = DeviceSampling("cpu", rows=len(rows))
    batched.set(rows)
    torch.manual_seed(0)
    logits = torch.randn(2 * len(rows), VOCAB) * 3
    seen = torch.rand(len(rows), VOCAB) < 0.05
    together = next_token_probs(logits, seen, batched)
    for i, params in enumerate(rows):
        alone = DeviceSampling("cpu")
        alone.set(params)
        assert torch.equal(together[i:i + 1], next_token_probs(logits[2 * i:2 * i + 2], seen[i:i + 1], alone)), params
    with pytest.raises(ValueError, match="one per utterance"):
        batched.set(rows[:2])
