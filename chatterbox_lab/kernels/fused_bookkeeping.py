"""A decode step's bookkeeping in the kernels at its two ends.

With every matmul, attention and the sampling as our own kernels, a captured step
still spends about a dozen small PyTorch kernels on bookkeeping: reading the last
token at the step counter, marking it for the repetition penalty, two embedding
gathers and their sum, the cache position, advancing the counter, the random
draw and writing the new token. Each is a launch's latency for almost no work, and
none is a programmatic dependent, so the chain of our kernels starts cold after
them: about 50 us of a 0.88 ms step on an H100 (trace of `launch_ahead`). Here:

- the random draw comes first: it is the step's only draw, so it takes the same
  numbers from PyTorch's generator wherever it sits in the step;
- one prologue kernel, a program per utterance, reads the utterance's last token
  at the step counter, marks it seen, writes its input embedding (token table plus
  position table, summed in the model's dtype as PyTorch sums them) into both of
  its CFG rows, and its cache position;
- the sampling kernel writes the token it draws into the next slot, and the last
  of its programs to finish advances the step counter (an arrival counter, as the
  attention kernel combines its stretches);
- so the sampling kernel follows the speech head directly and, as its programmatic
  dependent, loads the mask and the sampling values before its wait.

Same state, same numbers as `decoder.T3Decoder`'s PyTorch bookkeeping (CPU test
under Triton's interpreter: the same tokens for the same seed).
"""
from __future__ import annotations

import torch

from chatterbox_lab.kernels import fused_matvec

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl

    @triton.jit
    def write_step_input(utterance, token, step, seen_ptr, stride_seen, prompt_len_ptr, token_table_ptr,
                         position_table_ptr, embeds_ptr, positions_ptr, DIM: tl.constexpr,
                         SHARED_POSITION: tl.constexpr):
        """Step `step`'s input for an utterance whose last token is `token`: the token marked seen,
        its embedding in both CFG rows, the cache position (the prologue's work, and under
        `folded_prologue` the end of the sampling kernel's)."""
        tl.store(seen_ptr + utterance * stride_seen + token, 1)
        dims = tl.arange(0, DIM)
        embed = (tl.load(token_table_ptr + token * DIM + dims).to(tl.float32)
                 + tl.load(position_table_ptr + (step + 1) * DIM + dims).to(tl.float32))
        embed = embed.to(embeds_ptr.dtype.element_ty)
        tl.store(embeds_ptr + 2 * utterance * DIM + dims, embed)
        tl.store(embeds_ptr + (2 * utterance + 1) * DIM + dims, embed)
        position = tl.load(prompt_len_ptr + utterance) + step
        if SHARED_POSITION:  # a lone CFG pair: one position for both rows, as the attention kernel takes it
            tl.store(positions_ptr, position)
        else:
            tl.store(positions_ptr + 2 * utterance, position)
            tl.store(positions_ptr + 2 * utterance + 1, position)

    @triton.jit
    def _prologue_kernel(tokens_ptr, stride_tokens, step_ptr, seen_ptr, stride_seen, prompt_len_ptr,
                         token_table_ptr, position_table_ptr, embeds_ptr, positions_ptr, DIM: tl.constexpr,
                         SHARED_POSITION: tl.constexpr):
        utterance = tl.program_id(0)
        step = tl.load(step_ptr)
        token = tl.load(tokens_ptr + utterance * stride_tokens + step)
        write_step_input(utterance, token, step, seen_ptr, stride_seen, prompt_len_ptr, token_table_ptr,
                         position_table_ptr, embeds_ptr, positions_ptr, DIM, SHARED_POSITION)


def kernel_applies(tokens: torch.Tensor) -> bool:
    if triton is None:
        return False
    return tokens.is_cuda or (tokens.device.type == "cpu" and fused_matvec.interpreter_on_cpu)


class StepBuffers:
    """Where the prologue writes a step's input: embeddings (2n, 1, dim) and cache positions, (1,)
    for a lone utterance or (2n, 1), at fixed addresses so a captured graph serves every step; the
    step's random draw (n, vocab), and the sampling kernel's arrival counter."""

    def __init__(self, streams: int, dim: int, vocab: int, dtype: torch.dtype, device):
        self.embeds = torch.empty(2 * streams, 1, dim, dtype=dtype, device=device)
        self.positions = torch.empty((1,) if streams == 1 else (2 * streams, 1), dtype=torch.long, device=device)
        self.noise = torch.empty(streams, vocab, dtype=torch.float32, device=device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=device)
        for t in (self.embeds, self.positions, self.noise, self.arrivals):
            torch._dynamo.mark_static_address(t)


class InputSources:
    """What the prologue makes a step's input from, besides the tokens and the mask: per utterance
    the prompt length, the token and position embedding tables, and where the input goes."""

    def __init__(self, prompt_len: torch.Tensor, token_table: torch.Tensor, position_table: torch.Tensor,
                 out: StepBuffers):
        dim = token_table.size(1)
        if token_table.stride() != (dim, 1) or position_table.stride() != (dim, 1):
            raise ValueError("the prologue kernel addresses the embedding tables as contiguous rows")
        if dim & (dim - 1):
            raise ValueError(f"the prologue kernel reads whole embedding rows as one block: dim must be a power of "
                             f"two, got {dim}")
        self.prompt_len, self.token_table, self.position_table, self.out = prompt_len, token_table, position_table, out

    def kernel_args(self) -> tuple:
        """The arguments `write_step_input` takes after the mask, and its constants."""
        return ((self.prompt_len, self.token_table, self.position_table, self.out.embeds, self.out.positions),
                dict(DIM=self.token_table.size(1), SHARED_POSITION=self.out.positions.numel() == 1))


def prologue(tokens: torch.Tensor, step_index: torch.Tensor, seen: torch.Tensor, sources: InputSources):
    """The step's input, from device state only: for every utterance u, token = tokens[u, step],
    seen[u, token] = True, both CFG rows' embedding token_table[token] + position_table[step + 1],
    position prompt_len[u] + step. Returns (embeds, positions) from `sources.out`."""
    from torch.library import wrap_triton

    args, constants = sources.kernel_args()
    wrap_triton(_prologue_kernel)[(tokens.size(0),)](
        tokens, tokens.stride(0), step_index, seen.view(torch.uint8), seen.stride(0), *args, **constants,
        num_warps=4)
    return sources.out.embeds, sources.out.positions
