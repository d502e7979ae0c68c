"""The library baseline for 8-bit weights: torchao's weight-only quantization on the `compiled` rung.

A user who wants 8-bit weights would first try torchao: `quantize_` swaps each linear layer's
weight for an 8-bit tensor subclass (a scale per output channel), and torch.compile generates
the dequantizing matmuls. Our 8-bit steps must beat it, or the chapter says the library is the
better choice. Two rungs, each the `compiled` rung's steps on a copy of T3 quantized by torchao:

- `torchao_int8`: `Int8WeightOnlyConfig`;
- `torchao_float8`: `Float8WeightOnlyConfig` (e4m3; Hopper or later).

Only the transformer's linear layers and the speech head are quantized, as our steps do; the
conditioning encoder and the embeddings stay bf16. torchao is optional: without it the rungs are
skipped, with a message that says how to install it.
"""
from __future__ import annotations

import copy

import torch

RUNGS = ("torchao_int8", "torchao_float8")
# Which of our formats each rung corresponds to (for its memory floor).
FORMAT = {"torchao_int8": "int8", "torchao_float8": "fp8"}
# The release the records were made with; torchao pairs each release with a torch release.
VERSION = "0.18.0"


def missing_reason(rung: str, device) -> str | None:
    """Why `rung` cannot run here (torchao absent, or fp8 on a card before Hopper), or None."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return (f"torchao is not installed: `pip install torchao=={VERSION}` (or the release paired with this "
                f"torch) to measure {rung}")
    device = torch.device(device)
    if device.type != "cuda":
        return f"{rung} runs torch.compile's CUDA graphs: it needs a CUDA GPU"
    if rung == "torchao_float8" and torch.cuda.get_device_capability(device) < (8, 9):
        return "torchao's float8 weights need an Ada, Hopper or later GPU"
    return None


def _config(rung: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if rung == "torchao_int8" else Float8WeightOnlyConfig()


def _quantized_here(module: torch.nn.Module, name: str) -> bool:
    """The layers our 8-bit steps quantize: every linear of the transformer's layers, and the head."""
    return isinstance(module, torch.nn.Linear) and (name.startswith("tfmr.layers.") or name == "speech_head")


def decoder(t3, rung: str, steps, **options):
    """A `T3Decoder` for `steps` (the `compiled` rung's) on a bf16 copy of `t3` whose linear layers
    torchao has quantized for `rung`; `options` go to the decoder. The copy leaves `t3` as it was."""
    from torchao.quantization import quantize_

    from chatterbox_lab.decode.decoder import T3Decoder

    if rung not in RUNGS:
        raise ValueError(f"unknown torchao rung {rung!r}: choose from {', '.join(RUNGS)}")
    quantized = copy.deepcopy(t3).to(torch.bfloat16)
    # Built before quantize_: the decoder casts its model to bf16 (a tensor subclass need not take
    # a cast) and reads only dtypes and devices; the step compiles at its first call, after it.
    built = T3Decoder(quantized, steps, **options)
    quantize_(quantized, _config(rung), filter_fn=_quantized_here)
    return built
