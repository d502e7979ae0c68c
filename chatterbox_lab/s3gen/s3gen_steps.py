"""S3Gen's steps: the waveform side made fast without changing what it computes.

Once T3 is fast, S3Gen's flow is most of a request: ten Euler steps of the CFM
estimator (a U-Net with transformer blocks, CFG pair as a batch of two) over the
voice's prompt frames plus two mel frames per new token, each call well over a
thousand small kernels launched one by one from Python. Like upstream's T3 loop,
it waits on the host more than on the GPU: replaying the same fp32 kernels from
graphs alone cuts the flow's time by more than half (`data/results/e2e/`). So graphs
come first and half precision second, the order of T3's ladder.

- "flow_graphs": the estimator replayed from CUDA graphs, one per batch size and
  length bucket (`FRAME_BUCKET` frames). A call's frames are padded to its bucket
  with masked frames. The estimator's convolutions are causal, its attention masks
  padded keys and every block multiplies by the mask, so a padded frame changes no
  real one: the output is the unpadded call's (CPU test, tiny preset; GPU test, full
  preset). Captured on first use of a bucket.
- "flow_half": the estimator in float16. float16, not bfloat16: the estimator's values
  are small and float16's three extra mantissa bits make its error several times
  smaller (`half_flow_error(tts, tokens, dtype=...)` compares them; notebook 07). The
  encoder, HiFi-GAN (STFTs) and everything around the estimator stay fp32; the mel
  difference from fp32 after all ten steps is measured in every S3Gen bench run.
- "watermark_on_device": perth's watermarking network on the model's device; it
  ran on the CPU in upstream (its resampling stays there either way).
- "encoder_graphs": the flow's encoder (conformer, 2x upsampling, conformer; fp32)
  replayed from CUDA graphs per batch size and `TOKEN_BUCKET` tokens. Padding is exact
  once the embedding's output is zeroed past each row's length (`padding_zeroed`): the
  look-ahead convolution is the only layer that reads ahead and attention masks padded
  keys (CPU test; on a GPU its mels are within the GPU test's relative tolerance of the
  eager encoder's, since padded lengths select other kernels).
- "voice_encoders_on_host": S3Gen's speech tokenizer and speaker encoder, which only
  prepare a voice's conditionals (about half of S3Gen's weights in the full preset),
  stay in host memory and visit the device just for that (`voice_encoders_on_device`):
  a request with a cached voice never needs them. A new voice pays the two copies.
- "hifigan_compiled": HiFi-GAN's convolution stack under torch.compile, one compile for every
  length (dynamic shapes). Eager, it is about 1,200 small kernels per call (its weight norms
  recomputed, its Snake activations six kernels each), launched one by one: its time hardly
  depends on the audio's length. Its weight norms are folded into plain weights first (the
  same values, bit for bit: upstream's own `_weight_norm` computes them once instead of every
  call). Its f0 predictor and random source stay eager: Inductor's dynamic-shape code for
  the source fails to build on the GPU (torch 2.11), and eager they draw upstream's numbers.
- "flow_fused_projections": each of the estimator's 56 self-attentions computes q, k and v as
  one matmul (diffusers' `FusedAttnProcessor2_0` over a matrix of which upstream's three
  weights are views, as T3's `fused_projections` builds them: no weight is held twice): 112
  fewer kernels a call, which at these sizes cost launch and ramp, not bandwidth.
- "flow_compiled": the estimator's blocks under torch.compile inside `flow_graphs`' graphs. A
  graph removes the launches' host cost, not the GPU's per-kernel cost: a replay still runs
  some 1,460 kernels, about 5 ms whatever the length (a flow run of ten calls took 52 ms for
  a 16-token chunk and 64 ms for 256 tokens on an H200). With norms, activations, residuals
  and masks fused, about 1,200; with `flow_fused_projections` too, about 1,085 (GPU tests;
  the matmuls, attentions and convolutions stay one kernel each). One compile (dynamic
  shapes) serves every bucket, each still captured on first use. Compiled in place: the
  step stays on the estimator, graphs or not.

Steps are applied to a loaded model in place and cannot be taken back (reload the
model), as T3's bf16 step casts in place.
"""
from __future__ import annotations

import contextlib
import math

import torch

from chatterbox_lab import registry
from chatterbox_lab.graphed_calls import GraphedCalls
from chatterbox_lab.pipeline.padding import padding_zeroed
from chatterbox_lab.pipeline.voices import VOICE_PREPARATION
from chatterbox_lab.registry import S3GEN_STEPS
from chatterbox_lab.validation import check_flow_steps

FLOW_HALF_DTYPE = torch.float16
# Mel frames per length bucket: one graph serves every length up to its bucket.
# 64 frames (1.28 s of audio) keeps the padding, at most 63 frames, small next to a
# voice prompt of several hundred.
FRAME_BUCKET = 64
# Tokens (the voice's prompt and the new ones) per length bucket of the flow's encoder.
TOKEN_BUCKET = 32
# Relative L2 difference of the flow's mel output, fp32 vs `flow_half`, same tokens and
# noise: a bound with room above what the full and tiny presets measure (see the records).
HALF_FLOW_TOLERANCE = 5e-2


def check_s3gen_steps(steps) -> frozenset:
    """`steps` as S3Gen steps of the registry (unknown names refused; needs checked when applied)."""
    steps = frozenset(steps)
    unknown = sorted(steps - set(S3GEN_STEPS))
    if unknown:
        raise ValueError(f"unknown S3Gen steps {unknown}: choose from {', '.join(S3GEN_STEPS)}")
    return steps


def s3gen_steps_of(tts) -> frozenset:
    """The S3Gen steps applied to `tts` so far."""
    return frozenset(getattr(tts, "_chatterbox_lab_s3gen_steps", ()))


def apply_s3gen_steps(tts, steps) -> frozenset:
    """Switch on `steps` (any not yet on) for `tts`'s S3Gen and watermarker; returns all on now."""
    steps = check_s3gen_steps(steps)
    done = s3gen_steps_of(tts)
    registry.check(done | steps, model="s3gen")
    flow = tts.s3gen.flow
    if {"flow_half", "flow_graphs", "flow_compiled"} & (steps - done):
        estimator = _unwrapped(flow.decoder.estimator)
        if "flow_half" in steps - done:
            estimator.to(FLOW_HALF_DTYPE)
            if "flow_fused_projections" in done:
                _fuse_attention_projections(estimator)
        if "flow_graphs" in done | steps:  # rebuilt: graphs of earlier weights are stale
            flow.decoder.estimator = BucketedEstimator(estimator, compiled="flow_compiled" in done | steps)
    if "watermark_on_device" in steps - done:
        tts.watermarker.perth_net.to(tts.device)
    if "encoder_graphs" in steps - done:
        flow.encoder = BucketedEncoder(flow.encoder)
    if "voice_encoders_on_host" in steps - done:
        setattr(tts, VOICE_PREPARATION, voice_encoders_on_device)
        tts.s3gen.__class__ = _device_read_from_flow(type(tts.s3gen))
        for encoder in _voice_encoders(tts):
            encoder.to("cpu")
    if "hifigan_compiled" in steps - done:
        _compile_hifigan(tts.s3gen.mel2wav)
    if "flow_fused_projections" in steps - done:
        _fuse_attention_projections(_unwrapped(flow.decoder.estimator))
        if isinstance(flow.decoder.estimator, BucketedEstimator):
            flow.decoder.estimator.drop_graphs()  # captured with the unfused processors
    tts._chatterbox_lab_s3gen_steps = done | steps
    return done | steps


def _device_read_from_flow(cls):
    """Upstream's S3Gen class, its `device` read from the flow: upstream reads the tokenizer's,
    and puts every tensor of a request there."""
    return type(cls.__name__, (cls,), {"device": property(lambda self: next(self.flow.parameters()).device)})


def _compile_hifigan(hift) -> None:
    """Upstream's HiFTGenerator with its `decode` (the convolution stack from mels and source to
    waveform) compiled once for every length, in place. The f0 predictor and the source stay
    eager, so its random phase and noise are upstream's draws."""
    from torch.nn.utils import parametrize

    for module in hift.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if isinstance(module, torch.nn.Conv1d):
            # Upstream sets some from numpy's cumprod; Dynamo's guards on numpy scalars fail
            # under inference mode.
            module.stride, module.padding, module.dilation, module.kernel_size = (
                tuple(int(v) for v in values)
                for values in (module.stride, module.padding, module.dilation, module.kernel_size))
    hift.decode = torch.compile(hift.decode, dynamic=True, fullgraph=True)


def _voice_encoders(tts) -> tuple:
    return tts.s3gen.tokenizer, tts.s3gen.speaker_encoder


@contextlib.contextmanager
def voice_encoders_on_device(tts):
    """S3Gen's tokenizer and speaker encoder on `tts.device` for the duration (preparing a voice),
    back in host memory after: `voice_encoders_on_host` installs it as the voice preparation."""
    for encoder in _voice_encoders(tts):
        encoder.to(tts.device)
    try:
        yield
    finally:
        for encoder in _voice_encoders(tts):
            encoder.to("cpu")


def _unwrapped(estimator):
    return estimator.estimator if isinstance(estimator, BucketedEstimator) else estimator


class BucketedEstimator(GraphedCalls):
    """Upstream's CFM estimator with each call padded to a length bucket and, on CUDA,
    replayed from a graph captured for that bucket and batch size. Called exactly as
    upstream's `solve_euler` calls the estimator; anything else (meanflow's `r`) runs eagerly."""

    def __init__(self, estimator: torch.nn.Module, frame_bucket: int = FRAME_BUCKET, compiled: bool = False):
        super().__init__()
        if getattr(estimator, "static_chunk_size", 0):
            raise ValueError("chunked attention in the estimator is not supported by flow_graphs")
        self.estimator = estimator
        self.frame_bucket = frame_bucket
        self.compiled = compiled
        if compiled:
            _compile_blocks(estimator)

    @property
    def dtype(self) -> torch.dtype:
        return self.estimator.dtype

    def _context(self):
        return _sync_free_attention_masks()

    def forward(self, x, mask, mu, t, spks=None, cond=None, r=None):
        if r is not None or spks is None or cond is None:
            return self.estimator(x=x, mask=mask, mu=mu, t=t, spks=spks, cond=cond, r=r)
        frames = x.size(2)
        padded = math.ceil(frames / self.frame_bucket) * self.frame_bucket
        output = self._run((x.size(0), padded, x.dtype), self.estimator,
                           _padded_inputs(x, mask, mu, t, spks, cond, padded))
        return output[:, :, :frames].clone()


def _fuse_attention_projections(estimator: torch.nn.Module) -> None:
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from chatterbox_lab.decode.fused_projections import fused_weight

    for attn in estimator.modules():
        if not isinstance(attn, Attention) or attn.is_cross_attention:
            continue
        # Upstream's three weights become views of one matrix; again after a cast, which
        # copies each view into a tensor of its own.
        qkv = fused_weight([attn.to_q, attn.to_k, attn.to_v])
        attn.to_qkv = torch.nn.Linear(qkv.size(1), qkv.size(0), bias=False, device="meta")
        attn.to_qkv.weight = torch.nn.Parameter(qkv, requires_grad=False)
        attn.fused_projections = True  # what diffusers' own fuse_projections() marks
        attn.set_processor(FusedAttnProcessor2_0())


def _compile_blocks(estimator: torch.nn.Module) -> None:
    """The estimator's transformer and resnet blocks compiled in place, each kind once: its 56
    transformer blocks share one compiled graph (torch.compile's regional compilation). The
    whole estimator compiled as one took 134 s cold on an H100; its blocks, about 80 s on an
    H200. What joins the blocks (time embedding, masks, up- and downsampling) stays eager, a
    few dozen kernels."""
    from chatterbox.models.s3gen.matcha.decoder import ResnetBlock1D
    from chatterbox.models.s3gen.matcha.transformer import BasicTransformerBlock

    for module in estimator.modules():
        if isinstance(module, (BasicTransformerBlock, ResnetBlock1D)) and module._compiled_call_impl is None:
            module.compile(dynamic=True, fullgraph=True)


class BucketedEncoder(GraphedCalls):
    """Upstream's flow encoder with its input padded to a token bucket, the embedding's output
    zeroed past each row's length, and on CUDA replayed from a graph per bucket and batch
    size; its output trimmed back. Called as upstream's flow calls it, `(xs, xs_lens)`;
    a chunked (streaming-mode) call runs eagerly."""
    zeroes_own_padding = True  # `padding_zeroed` leaves it as it is

    def __init__(self, encoder: torch.nn.Module, token_bucket: int = TOKEN_BUCKET):
        super().__init__()
        self.encoder = encoder
        self.token_bucket = token_bucket

    def output_size(self) -> int:
        return self.encoder.output_size()

    def _context(self):
        return _sync_free_attention_masks()

    def forward(self, xs, xs_lens, decoding_chunk_size: int = 0, num_decoding_left_chunks: int = -1):
        if decoding_chunk_size != 0 or num_decoding_left_chunks != -1:
            return self.encoder(xs, xs_lens, decoding_chunk_size, num_decoding_left_chunks)
        tokens = xs.size(1)
        padded = math.ceil(tokens / self.token_bucket) * self.token_bucket
        inputs = dict(xs=torch.nn.functional.pad(xs, (0, 0, 0, padded - tokens)), xs_lens=xs_lens.clone())
        h, masks = self._run((xs.size(0), padded, xs.dtype), self._zeroed, inputs)
        frames = tokens * self.encoder.up_layer.stride
        return h[:, :frames].clone(), masks[..., :frames].clone()

    def _zeroed(self, xs, xs_lens):
        with padding_zeroed(self.encoder):
            return self.encoder(xs, xs_lens)


def _padded_inputs(x, mask, mu, t, spks, cond, frames: int) -> dict:
    def pad(value):
        return torch.nn.functional.pad(value, (0, frames - value.size(-1)))
    return dict(x=pad(x), mask=pad(mask), mu=pad(mu), t=t.clone(), spks=spks.clone(), cond=pad(cond))


@contextlib.contextmanager
def _sync_free_attention_masks():
    """Upstream's `add_optional_chunk_mask` ends with a host check (`.item()`) for rows with
    no valid frame, which a CUDA graph cannot capture. For the full-context calls of the
    estimator and the encoder it only returns the mask with such rows set to True: the same
    on the device, no sync."""
    from chatterbox.models.s3gen import decoder
    from chatterbox.models.s3gen.transformer import upsample_encoder

    users = (decoder, upsample_encoder)
    originals = [module.add_optional_chunk_mask for module in users]
    for module in users:
        module.add_optional_chunk_mask = _full_context_mask
    try:
        yield
    finally:
        for module, original in zip(users, originals):
            module.add_optional_chunk_mask = original


def _full_context_mask(xs, masks, use_dynamic_chunk, use_dynamic_left_chunk, decoding_chunk_size,
                       static_chunk_size, num_decoding_left_chunks, enable_full_context=True):
    # One function for the whole process: torch.compile guards on its identity.
    if use_dynamic_chunk or static_chunk_size > 0:
        raise ValueError("S3Gen's graphs support full-context attention only")
    return masks | (masks.sum(dim=-1, keepdim=True) == 0)


def _flow_mels(tts, speech_tokens: torch.Tensor, seed: int, flow_steps: int | None = None) -> torch.Tensor:
    torch.manual_seed(seed)  # the flow's starting noise
    with torch.inference_mode():
        return tts.s3gen.flow_inference(speech_tokens, ref_dict=tts.conds.gen, finalize=True,
                                        n_cfm_timesteps=flow_steps).float()


def _relative_difference(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


def fewer_flow_steps_error(tts, speech_tokens: torch.Tensor, flow_steps: int, seed: int = 0) -> float:
    """Relative L2 difference of the flow's mels with `flow_steps` Euler steps from upstream's
    10: same tokens, same voice (the one prepared last), same starting noise, the flow as it
    is installed. The same ODE integrated on a coarser grid: the difference is that grid's
    integration error, not a bound on how the audio sounds."""
    check_flow_steps(flow_steps)
    return _relative_difference(_flow_mels(tts, speech_tokens, seed, flow_steps), _flow_mels(tts, speech_tokens, seed))


def half_flow_error(tts, speech_tokens: torch.Tensor, seed: int = 0, dtype: torch.dtype = FLOW_HALF_DTYPE) -> float:
    """Relative L2 difference of the flow's mels with the estimator in `dtype` from the same
    in fp32: same tokens, same voice (the one prepared last), same noise. Measured on the
    unwrapped estimator before `flow_half` is applied, which is left as it was."""
    from chatterbox_lab.decode.precision import weights_restored

    decoder = tts.s3gen.flow.decoder
    installed = decoder.estimator
    estimator = _unwrapped(installed)
    if estimator.dtype != torch.float32:
        raise ValueError("measure the half-precision error before flow_half is applied (the estimator is not fp32)")
    decoder.estimator = estimator  # measured eagerly, without the graphs
    try:
        reference = _flow_mels(tts, speech_tokens, seed)
        with weights_restored(estimator):
            estimator.to(dtype)
            half = _flow_mels(tts, speech_tokens, seed)
    finally:
        decoder.estimator = installed
        if isinstance(installed, BucketedEstimator):
            installed.drop_graphs()  # the cast and the restore reallocated the weights
    return _relative_difference(half, reference)
