"""HiFi-GAN and the watermark for many utterances at once.

Upstream vocodes and watermarks one utterance per call. Each call is a few hundred
kernels whatever the audio's length, so a batch of short calls is mostly launch and
ramp time (`data/results/e2e/`). Neither network masks padding: a padded row's
convolutions would read the padding near its end. So utterances are batched only
with others of exactly their length: each row is then what it would be alone, up
to the order of floating-point sums. A text batch decoded to a fixed token count
is one group; sentences of different lengths fall back to one call each.

- HiFi-GAN: upstream's `hift_inference` on a stack of equal-length mels. Its source
  draws random phases and noise per row, the same distribution as one call per
  utterance but not the same numbers (like any change of batch).
- Watermark: perth's implicit watermarker, as its `apply_watermark` does it (resample
  to its rate, STFT, encoder, inverse STFT, resample back), with the resampling spread
  over threads (soxr releases the GIL) and the network run on stacked rows.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Mel frames per HiFi-GAN call: 32 ten-second utterances. The activations of its last
# upsampling stage are about 0.5 GB per 16k frames in fp32.
MAX_VOCODER_FRAMES = 32 * 512
# Samples per watermarking call at the network's rate: 32 ten-second utterances at 32 kHz.
# Their spectrograms take about 0.3 GB.
MAX_WATERMARK_SAMPLES = 32 * 320_000


def equal_length_groups(lengths, max_total: int | None = None) -> list[list[int]]:
    """Indices grouped by equal length, in first-seen order; a group is split so that its
    lengths sum to at most `max_total` (always at least one index)."""
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    groups = []
    for n, indices in by_length.items():
        per_group = max(1, max_total // max(n, 1)) if max_total else len(indices)
        groups += [indices[start:start + per_group] for start in range(0, len(indices), per_group)]
    return groups


def vocode_all(s3gen, mels: list) -> list:
    """Mels (80, frames_i) of S3Gen's flow -> waveforms (samples_i,) on the device, through
    upstream's HiFi-GAN with its fade-in, one call per group of equal lengths."""
    wavs = [None] * len(mels)
    # Upstream's hift_inference returns inference tensors, which only inference mode may fade.
    with torch.inference_mode():
        for group in equal_length_groups([mel.size(-1) for mel in mels], MAX_VOCODER_FRAMES):
            batch = torch.stack([mels[i] for i in group]).to(dtype=s3gen.dtype)
            made, _ = s3gen.hift_inference(batch, None)
            made[:, : len(s3gen.trim_fade)] *= s3gen.trim_fade
            for i, wav in zip(group, made):
                wavs[i] = wav
    return wavs


def watermark_all(watermarker, wavs: list, sample_rate: int) -> list:
    """Waveforms (numpy, `sample_rate`) -> watermarked ones, as upstream's
    `watermarker.apply_watermark` makes each, with the network run once per group of equal
    lengths. A watermarker other than perth's implicit one is applied one by one."""
    net = getattr(watermarker, "perth_net", None)
    if net is None or not hasattr(net, "encoder"):
        return [watermarker.apply_watermark(wav, sample_rate=sample_rate) for wav in wavs]
    from librosa import resample

    net_rate = net.hp.sample_rate

    def resampled(orig_sr, target_sr):
        return lambda wav: wav if orig_sr == target_sr else resample(wav, orig_sr=orig_sr, target_sr=target_sr)
    with ThreadPoolExecutor(max_workers=max(1, min(len(wavs), os.cpu_count() or 1))) as pool:
        signals = list(pool.map(resampled(sample_rate, net_rate), wavs))
        marked = [None] * len(signals)
        for group in equal_length_groups([len(s) for s in signals], MAX_WATERMARK_SAMPLES):
            batch = torch.from_numpy(np.stack([signals[i] for i in group])).to(dtype=torch.float, device=net.device)
            magspec, phase = net.ap.signal_to_magphase(batch)
            marked_magspec, _ = net.encoder(magspec)
            rows = net.ap.magphase_to_signal(marked_magspec, phase).detach().cpu().numpy()
            for i, row in zip(group, rows):
                marked[i] = row
        return list(pool.map(resampled(net_rate, sample_rate), marked))
