"""Padding that changes nothing: what lets utterances of different lengths share one flow run."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def padding_zeroed(encoder):
    """Upstream's flow encoder with its embedding's output zeroed past each row's length.
    Its look-ahead convolution reads the frames after a row's last token: zeros when the row
    runs alone (the convolution's own padding), embedded padding when the row is padded (in
    a batch, or to a bucket), which then reaches every frame through attention. Zeroed, a
    padded row's output is the lone row's; a row without padding is unchanged. An encoder that
    zeroes its own padding on every call already (`zeroes_own_padding`) is left as it is."""
    if getattr(encoder, "zeroes_own_padding", False):
        yield
        return

    def zero_padding(module, args, output):
        xs, pos_emb, masks = output
        return xs * masks.transpose(1, 2).to(xs.dtype), pos_emb, masks

    handle = encoder.embed.register_forward_hook(zero_padding)
    try:
        yield
    finally:
        handle.remove()
