"""Where a loaded model's device memory goes: weights by part, the KV cache, CUDA graphs' pools.

`torch.cuda.memory_allocated` is one number; a memory goal needs to know which part to cut.
The parts are measured, not estimated: weights from the tensors the modules hold (each storage
counted once, so fused views are not counted twice), graph pools from the allocator's
snapshot (memory the captured graphs keep for their intermediates and outputs, reserved for
replays whether or not a tensor holds it now), and what is left over, unattributed.
"""
from __future__ import annotations

import torch

MIB = 2**20


def _device_bytes(tensors, device: torch.device, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.device != device:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_bytes(module: torch.nn.Module, device, seen: set | None = None) -> int:
    """Bytes of `module`'s parameters and buffers on `device`, each storage once (and none
    already in `seen`, which is updated)."""
    seen = set() if seen is None else seen
    return _device_bytes([*module.parameters(), *module.buffers()], torch.device(device), seen)


def graph_pool_mib(device) -> dict:
    """Memory in the allocator's private pools (those of CUDA graphs), MiB: `reserved`, what
    their segments hold, and `allocated`, what live tensors (graph outputs) hold of it."""
    reserved = allocated = 0
    for segment in torch.cuda.memory_snapshot():
        if segment["device"] != torch.device(device).index or tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0):
            continue
        reserved += segment["total_size"]
        allocated += segment["allocated_size"]
    return dict(reserved=reserved / MIB, allocated=allocated / MIB)


def resident_parts_mib(tts, decoder=None) -> dict | None:
    """`tts`'s device memory now by part, MiB (None on the CPU): weights of T3 and of S3Gen's
    flow encoder, flow estimator, HiFi-GAN and the rest of S3Gen, the voice encoder and the
    watermarker; `decoder`'s KV cache; graph pools; `other_allocated` (allocated tensors not in
    any of those: sampling and embedding tables, work buffers); and the allocator's totals."""
    device = torch.device(tts.device)
    if device.type != "cuda":
        return None
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    seen: set = set()
    s3gen = tts.s3gen
    flow = s3gen.flow
    parts = {
        "t3_weights": module_bytes(tts.t3, device, seen),
        "flow_encoder_weights": module_bytes(flow.encoder, device, seen),
        "flow_estimator_weights": module_bytes(flow.decoder, device, seen),
        "hifigan_weights": module_bytes(s3gen.mel2wav, device, seen),
        "s3gen_other_weights": module_bytes(s3gen, device, seen),
        "voice_encoder_weights": module_bytes(tts.ve, device, seen),
        "watermarker_weights": module_bytes(tts.watermarker.perth_net, device, seen)
        if isinstance(getattr(tts.watermarker, "perth_net", None), torch.nn.Module) else 0,
    }
    cache = getattr(getattr(decoder, "forward", None), "cache", None)
    parts["kv_cache"] = _device_bytes([*cache.keys, *cache.values], device, seen) if cache is not None else 0
    figures = {name: value / MIB for name, value in parts.items()}
    pools = graph_pool_mib(device)
    allocated = torch.cuda.memory_allocated(device) / MIB
    figures.update(
        graph_pools_reserved=pools["reserved"],
        graph_pools_allocated=pools["allocated"],
        other_allocated=allocated - sum(figures.values()) - pools["allocated"],
        allocated=allocated,
        reserved=torch.cuda.memory_reserved(device) / MIB,
    )
    return figures
