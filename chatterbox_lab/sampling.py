"""Next-token probabilities with upstream's exact arithmetic, values held on the device.

Upstream's loop runs transformers' logits processors (repetition penalty,
temperature, min-p, top-p) on the CFG-combined logits, then `softmax` and
`torch.multinomial`. This module computes the same numbers with the same
operations in the same order, so an fp32 run gives the same tokens as upstream
for the same seed, but in a form a CUDA graph can hold:

- the sampling values are 0-d device tensors, not Python floats, so changing
  them between requests changes data, not the captured program (a Python float
  would be baked in as a constant and force a recompile);
- the repetition penalty reads a boolean "already generated" mask over the
  vocabulary instead of a growing list of ids: the same elements are penalised,
  and the shapes never change.

`sample_token` is the algorithm `torch.multinomial` uses for one sample (an
exponential race: argmax of p / q with q ~ Exp(1)), drawing from the global RNG
exactly as upstream's call does, so a seeded run picks the same tokens. What it
leaves out is multinomial's input validation, which reads a flag back to the host
and so stalls the CPU every token (and cannot be captured in a CUDA graph); the
decoder checks for non-finite probabilities on the device instead. Inside a
compiled step it keeps PyTorch's own RNG kernel (`compile_step(random_in_graph=True)`),
so the draws stay the eager ones.

The arithmetic runs in float32 whatever the model's dtype. For an fp32 model that
is upstream's arithmetic bit for bit; for a bf16 model upstream rounds the CFG
mix and the penalties to bf16 (1.2 becomes 1.203125), which this does not copy.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from chatterbox_lab.validation import check_number, check_turbo_sampling


@dataclass(frozen=True)
class SamplingParams:
    """Upstream `ChatterboxTTS.generate` defaults."""
    temperature: float = 0.8
    cfg_weight: float = 0.5
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    top_p: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            check_number(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class TurboSamplingParams:
    """Upstream `ChatterboxTurboTTS.generate` defaults. `top_k`: 0 keeps every token, as upstream's
    loop does when it leaves the warper out."""
    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            check_number(name, getattr(self, name))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 keeps every token), got {self.top_k!r}")


def sampling_for(model: str, **given):
    """A request's sampling values for `model` over that model's defaults: `TurboSamplingParams` for
    Turbo, which refuses the fields upstream's Turbo would silently ignore; `SamplingParams` else.
    `given`: the fields the caller set, by name (top_k too), None for those left out."""
    given = {name: value for name, value in given.items() if value is not None}
    if model == "turbo":
        check_turbo_sampling(**given)
        return TurboSamplingParams(**given)
    if "top_k" in given:
        raise ValueError(f"top_k applies to the turbo model only; the {model} model samples with min_p and top_p")
    return SamplingParams(**given)


class DeviceSampling:
    """Sampling values as float32 tensors on the device, updated in place per request: those of
    `SamplingParams`, or with `turbo`, those of `TurboSamplingParams`. One set for every utterance
    (0-d tensors), or with `rows`, a set per utterance ((rows, 1) tensors, which broadcast over
    each utterance's row of scores): utterances of different requests decoded together."""

    NAMES = ("temperature", "cfg_weight", "repetition_penalty", "min_p", "one_minus_top_p")
    TURBO_NAMES = ("temperature", "top_k", "repetition_penalty", "one_minus_top_p")

    def __init__(self, device, turbo: bool = False, rows: int | None = None):
        names = self.TURBO_NAMES if turbo else self.NAMES
        shape = () if rows is None else (rows, 1)
        self.rows = rows
        self.values = {n: torch.zeros(shape, device=device, dtype=torch.float32) for n in names}
        for t in self.values.values():
            torch._dynamo.mark_static_address(t)

    def set(self, params) -> None:
        """`params`: one set for every utterance, or with `rows`, a sequence of one set per utterance."""
        per_row = isinstance(params, (list, tuple))
        if per_row and len(params) != (self.rows or 1):
            raise ValueError(f"expected {self.rows or 1} sets of sampling values, one per utterance, got {len(params)}")
        for name, t in self.values.items():
            if per_row:
                t.copy_(torch.tensor([[_value(p, name)] for p in params], dtype=torch.float64).view(t.shape))
            else:
                t.fill_(_value(params, name))

    def __getitem__(self, name):
        return self.values[name]

    @property
    def row_stride(self) -> int:
        """How far apart two utterances' values are: 0 when they share one set."""
        return 0 if self.rows is None else 1


def _value(params, name: str) -> float:
    # 1 - top_p is formed in double precision, as transformers' TopP warper does.
    return 1 - params.top_p if name == "one_minus_top_p" else getattr(params, name)


def next_token_probs(logits: torch.Tensor, seen: torch.Tensor, sampling: DeviceSampling) -> torch.Tensor:
    """logits (2n, V), rows alternating conditional and unconditional -> probabilities (n, V)."""
    logits = logits.float()
    cond, uncond = logits[0::2], logits[1::2]
    scores = cond + sampling["cfg_weight"] * (cond - uncond)

    scores = repetition_penalised(scores, seen, sampling)
    scores = scores / sampling["temperature"]

    # MinPLogitsWarper: drop tokens less likely than min_p times the best one.
    probs = torch.softmax(scores, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    scores = scores.masked_fill(probs < sampling["min_p"] * top, -float("inf"))

    return torch.softmax(top_p_filtered(scores, sampling), dim=-1)


def top_p_filtered(scores: torch.Tensor, sampling: DeviceSampling) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose mass stays within
    1 - top_p, always keeping the most likely one."""
    sorted_scores, order = torch.sort(scores, descending=False)
    # One scan per utterance: Inductor 2.11 fails to generate a scan over several rows
    # that reads a per-row value such as the softmax's maximum (pytorch/pytorch#180221).
    cumulative = torch.cat([row.softmax(dim=-1).cumsum(dim=-1) for row in sorted_scores.split(1)])
    drop_sorted = cumulative <= sampling["one_minus_top_p"]
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -float("inf"))


def turbo_token_probs(logits: torch.Tensor, seen: torch.Tensor, sampling: DeviceSampling) -> torch.Tensor:
    """logits (n, V), one row per utterance (Turbo has no CFG) -> probabilities (n, V), by the
    processors of upstream's `T3.inference_turbo` in its order: temperature, top-k, top-p, then the
    repetition penalty. Each is the identity at its neutral value (temperature 1, top_k 0, top_p 1,
    penalty 1), where upstream leaves it out: dividing or multiplying by 1 is exact."""
    scores = logits.float() / sampling["temperature"]

    # TopKLogitsWarper: drop what scores below the k-th best. Its threshold is read from one full
    # sort at a device index, since torch.topk takes k as a host number.
    vocab = scores.size(-1)
    k = sampling["top_k"].long()
    k = torch.where(k > 0, k.clamp(max=vocab), vocab)
    threshold = torch.sort(scores, dim=-1, descending=True).values.index_select(-1, (k - 1).view(1))
    scores = scores.masked_fill(scores < threshold, -float("inf"))

    scores = top_p_filtered(scores, sampling)
    return torch.softmax(repetition_penalised(scores, seen, sampling), dim=-1)


def repetition_penalised(scores: torch.Tensor, seen: torch.Tensor, sampling: DeviceSampling) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on every id of the mask `seen`."""
    penalty = sampling["repetition_penalty"]
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def race_noise(probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Exp(1) draws `torch.multinomial` makes for one sample from each row of `probs` (into `out`,
    float32 and of `probs`' shape, if given)."""
    if out is None:
        out = torch.empty_like(probs, dtype=torch.float32)
    return out.exponential_(1)


def sample_token(probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.multinomial(probs, 1) without its per-call host sync: (n, 1) ids, written into `out` if given."""
    race = race_noise(probs)
    torch.div(probs, race, out=race)
    return torch.argmax(race, dim=-1, keepdim=True, out=out)
