"""Model sizes: the real Chatterbox architectures (`full`) and small ones (`tiny`), for each model.

`full` is exactly what upstream's constructors build. `tiny` keeps every upstream
class and interface (token vocabularies, sample rates, mel sizes, the Llama
decoder, the CFM flow, HiFi-GAN) but shrinks widths and depths so that CPU tests
run in seconds. Upstream hard-wires some sizes (the Perceiver is 1024 wide, the
S3 tokenizer ignores the config it is given), so those parts are rebuilt here
after construction rather than configured.

`upstream_constructors(preset, model)` is how the real `from_local` of each model
(`ChatterboxTTS`, `ChatterboxTurboTTS`, `ChatterboxMultilingualTTS`) builds a tiny
one: it swaps the two constructors that `from_local` calls for the duration of the
load, so the upstream loading code is what runs.

The three models (`validation.TTS_MODELS`) share the voice encoder and S3Gen's
classes. Turbo's T3 is a GPT-2 with 375 prompt speech tokens and no perceiver;
its S3Gen is the mean-flow variant. Multilingual's T3 is the original's Llama with
a 2,454-entry text vocabulary; its alignment checks read attention heads of layers
9, 12 and 13 (head 15 the highest), so its tiny Llama keeps 14 layers of 16 heads.
"""
from __future__ import annotations

import contextlib

import torch

from chatterbox_lab.validation import check_model

PRESETS = ("full", "tiny")

TINY_LLAMA = "chatterbox_lab_tiny"
TINY_MTL_LLAMA = "chatterbox_lab_tiny_multilingual"
TINY_GPT2 = "chatterbox_lab_tiny_gpt2"


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return preset


def _register_tiny_configs() -> None:
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS, LLAMA_520M_CONFIG_DICT

    tiny_llama = dict(LLAMA_520M_CONFIG_DICT, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    LLAMA_CONFIGS.setdefault(TINY_LLAMA, tiny_llama)
    LLAMA_CONFIGS.setdefault(TINY_MTL_LLAMA, dict(tiny_llama, num_hidden_layers=14, num_attention_heads=16,
                                                  num_key_value_heads=16, head_dim=8))
    LLAMA_CONFIGS.setdefault(TINY_GPT2, dict(GPT2_MEDIUM_CONFIG, n_embd=128, hidden_size=128, n_head=4, n_layer=2))


def turbo_hparams():
    """Turbo's T3 configuration, as `ChatterboxTurboTTS.from_local` sets it up."""
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


def _tiny_t3(hp):
    """Upstream's T3 for `hp` with the tiny transformer standing in for its full-size one."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.perceiver import Perceiver

    _register_tiny_configs()
    hp.llama_config_name = {"GPT2_medium": TINY_GPT2, "Llama_520M": TINY_LLAMA}[hp.llama_config_name]
    if hp.is_multilingual:
        hp.llama_config_name = TINY_MTL_LLAMA
    t3 = T3(hp)
    if t3.cond_enc.perceiver is not None:
        t3.cond_enc.perceiver = Perceiver(pre_attention_query_token=32, pre_attention_query_size=t3.dim,
                                          embedding_dim=t3.dim, num_attn_heads=4)
    return t3


def t3_hparams(model: str = "original"):
    """The T3 configuration `model`'s upstream `from_local` builds."""
    from chatterbox.models.t3.modules.t3_config import T3Config

    return {"original": T3Config.english_only, "turbo": turbo_hparams,
            "multilingual": T3Config.multilingual}[check_model(model)]()


def build_t3(preset: str = "full", model: str = "original"):
    from chatterbox.models.t3 import T3

    hp = t3_hparams(model)
    return T3(hp) if check_preset(preset) == "full" else _tiny_t3(hp)


def build_s3gen(preset: str = "full", meanflow: bool = False):
    """S3Gen; `meanflow`: Turbo's distilled flow, which runs 2 steps without CFG."""
    from chatterbox.models.s3gen import S3Gen

    s3gen = S3Gen(meanflow=meanflow)
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


def upstream_module(model: str):
    """The upstream module holding `model`'s class and its `from_local`."""
    import importlib

    return importlib.import_module({"original": "chatterbox.tts", "turbo": "chatterbox.tts_turbo",
                                    "multilingual": "chatterbox.mtl_tts"}[check_model(model)])


@contextlib.contextmanager
def upstream_constructors(preset: str, model: str = "original"):
    """Make `model`'s upstream `from_local` build `preset`-sized modules."""
    module = upstream_module(model)
    if check_preset(preset) == "full":
        yield
        return
    saved = module.T3, module.S3Gen
    # Each from_local builds T3 from the configuration it makes (or upstream's default) and
    # S3Gen with or without the mean flow; the tiny builders keep both choices.
    module.T3 = lambda hp=None: _tiny_t3(hp or t3_hparams(model))
    module.S3Gen = lambda meanflow=False: build_s3gen(preset, meanflow=meanflow)
    try:
        yield
    finally:
        module.T3, module.S3Gen = saved


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
