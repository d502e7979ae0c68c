"""Model sizes: the real Chatterbox architecture (`full`) and a small one (`tiny`).

`full` is exactly what upstream's constructors build. `tiny` keeps every upstream
class and interface (token vocabularies, sample rates, mel sizes, the Llama
decoder, the CFM flow, HiFi-GAN) but shrinks widths and depths so that CPU tests
run in seconds. Upstream hard-wires some sizes (the Perceiver is 1024 wide, the
S3 tokenizer ignores the config it is given), so those parts are rebuilt here
after construction rather than configured.

`upstream_constructors(preset)` is how the real `ChatterboxTTS.from_local`
builds a tiny model: it swaps the two constructors that `from_local` calls for
the duration of the load, so the upstream loading code is what runs.
"""
from __future__ import annotations

import contextlib

import torch

PRESETS = ("full", "tiny")

TINY_LLAMA = "chatterbox_lab_tiny"


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return preset


def _register_tiny_llama() -> None:
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS, LLAMA_520M_CONFIG_DICT

    if TINY_LLAMA not in LLAMA_CONFIGS:
        LLAMA_CONFIGS[TINY_LLAMA] = dict(
            LLAMA_520M_CONFIG_DICT,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
        )


def build_t3(preset: str = "full"):
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.perceiver import Perceiver
    from chatterbox.models.t3.modules.t3_config import T3Config

    if check_preset(preset) == "full":
        return T3()
    _register_tiny_llama()
    hp = T3Config.english_only()
    hp.llama_config_name = TINY_LLAMA
    t3 = T3(hp)
    width = t3.dim
    t3.cond_enc.perceiver = Perceiver(
        pre_attention_query_token=32,
        pre_attention_query_size=width,
        embedding_dim=width,
        num_attn_heads=4,
    )
    return t3


def build_s3gen(preset: str = "full"):
    from chatterbox.models.s3gen import S3Gen

    s3gen = S3Gen()
    if check_preset(preset) == "full":
        return s3gen
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.hifigan import HiFTGenerator
    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
    from chatterbox.models.s3gen.const import S3GEN_SR
    from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

    tokenizer = s3gen.tokenizer
    # Its rotary table is hard-wired to 64-wide heads: 2 heads of 64.
    tokenizer.encoder = AudioEncoderV2(tokenizer.config.n_mels, 128, 2, 1, 2, False)
    tokenizer.quantizer = FSQVectorQuantization(128, tokenizer.config.n_codebook_size)

    # The flow's conformer keeps its 512 width (its look-ahead layer is hard-wired
    # to it) but gets one block; the estimator shrinks to 64 channels.
    s3gen.flow.encoder = UpsampleConformerEncoder(
        output_size=512, attention_heads=4, linear_units=256, num_blocks=1,
        dropout_rate=0.0, positional_dropout_rate=0.0, attention_dropout_rate=0.0,
        normalize_before=True, input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn", input_size=512, use_cnn_module=False,
        macaron_style=False,
    )
    s3gen.flow.decoder.estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, channels=[64], dropout=0.0,
        attention_head_dim=32, n_blocks=1, num_mid_blocks=1, num_heads=2, act_fn="gelu",
        meanflow=s3gen.meanflow,
    )
    s3gen.mel2wav = HiFTGenerator(
        sampling_rate=S3GEN_SR, base_channels=32, upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7], source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        f0_predictor=ConvRNNF0Predictor(cond_channels=64),
    )
    return s3gen


@contextlib.contextmanager
def upstream_constructors(preset: str):
    """Make `chatterbox.tts.ChatterboxTTS.from_local` build `preset`-sized modules."""
    import chatterbox.tts as tts

    if check_preset(preset) == "full":
        yield
        return
    saved = tts.T3, tts.S3Gen
    tts.T3 = lambda: build_t3(preset)
    tts.S3Gen = lambda: build_s3gen(preset)
    try:
        yield
    finally:
        tts.T3, tts.S3Gen = saved


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
