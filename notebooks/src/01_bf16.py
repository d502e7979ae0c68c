# %% [markdown]
# # 01 · bf16: half the bytes per weight
#
# **The idea.** Decoding one token multiplies a batch of two vectors (the CFG
# pair) by every weight matrix of T3: two multiply-adds per weight, and each
# weight is read from memory once. In fp32 that is about 1 FLOP per byte read,
# while an H100 can do about 300 FLOPs in the time it reads one byte of HBM. So
# whenever the GPU, and not the host, sets the pace of a decode step, the pace
# is set by memory bandwidth, and storing the weights in bfloat16 halves the
# bytes: up to twice as fast per step, and about 1 GB less memory for T3's
# 0.5 B parameters.
#
# **Why bf16 and not fp16.** bf16 keeps fp32's 8-bit exponent, so nothing that
# fits in fp32 overflows and no scaling is needed; it keeps 8 bits of
# significand, so each value is rounded by at most 2⁻⁹ ≈ 0.2 % of itself.
# Through 30 layers those roundings add up, and a sampled token can flip where
# two candidates were nearly tied. So bf16 is checked on **logits**, not
# tokens: the fp32 reference and the bf16 decoder are both fed the same token
# sequence (teacher forcing), and their next-token logits must agree within a
# relative error of 5 %.
#
# **Why it may not help yet.** Notebook 00 showed that upstream's loop is
# bound by the host: the GPU sits idle most of each step, waiting for the
# next of over a thousand kernel launches. Making each kernel faster does not make the
# host issue them faster. This notebook measures what bf16 does on its own.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.measure import bench, equivalence
from chatterbox_lab.records import results
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.registry import ladder_prefix
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Half the bytes, the same words.")
print(f"device {tts.device}, preset {tts.preset}, T3 dtype {tts.t3.speech_head.weight.dtype}")

# %% [markdown]
# ## Before casting: the fp32 reference
#
# The bf16 step casts T3 **in place** (one copy of the weights on the device,
# so the memory figures below are bf16's own). Everything that needs the fp32
# model runs first:
#
# - the decoder every later notebook builds on, with no step switched on, must
#   give exactly upstream's tokens for the same seed;
# - the tokens upstream samples (seed 0, 24 of them) and upstream's fp32 logits
#   for that sequence, computed in one full-sequence forward, are kept as the
#   reference for the bf16 check further down.

# %%
identity = equivalence.token_identity(tts, text_tokens, [()], n=24, seed=0)
forced = equivalence.seeded_tokens(tts, text_tokens, 24, 0)
reference = equivalence.reference_logits(tts, text_tokens, forced)
print("reference logits:", tuple(reference.shape), "(steps, CFG pair, vocabulary)")

# %%
# NBVAL_CHECK_OUTPUT
print("decoder without steps gives upstream's tokens:", identity)

# %% [markdown]
# ## Measure on this machine
#
# Upstream fp32, then the decoder with bf16 weights (the bench casts T3 here).
# On a CPU these are the tiny model's numbers: its step is a few hundred small
# operators, so per-operator overhead sets the pace, and whether bf16 helps at
# all depends on whether the CPU has bf16 matrix instructions. They show that
# the rung runs and what it costs here, not what it does on a GPU.

# %%
local = bench.run(bench.BenchConfig(rungs=("upstream_fp32", "bf16"), tokens=32, repeats=2), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))
print("T3 dtype now:", tts.t3.speech_head.weight.dtype)

# %% [markdown]
# ## The same on an H100 (committed run)

# %%
h100 = results.latest_gpu_result()
shown = {k: h100["rungs"][k] for k in ("upstream_fp32", "bf16")}
display(Markdown(f"**{h100['provenance']['gpu']}**, torch {h100['provenance']['torch']}, "
                 f"{h100['provenance']['tokens']} tokens"))
display(Markdown(results.markdown_table({"rungs": shown})))

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (key, label) in zip(axes, {"t3_decode_tok_s": "T3 tokens/s", "peak_vram_mib": "peak memory, MiB"}.items()):
    ax.bar(list(shown), [r[key] for r in shown.values()], color=["tab:gray", "tab:orange"])
    ax.set_title(label + " (H100)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the H100 shows.** Memory drops as expected: the peak falls by about
# half of T3's fp32 weights. Speed goes the *wrong* way: in every committed
# H100 run bf16 decodes fewer tokens per second than upstream's fp32. The step is still launched kernel by kernel
# from Python, so its time is the host's time, and bf16 makes the host's work
# larger, not smaller: in an eager loop PyTorch's scaled-dot-product attention
# dispatches bf16 inputs to cuDNN, whose per-call host overhead is larger than
# that of the kernel fp32 gets, and the bf16 step launches more kernels per
# token (the table above). The bytes saved on the GPU are real, but
# the GPU was not what the loop waited for. They pay off once launches stop
# dominating: that takes a step with fixed shapes (02, 03) replayed as a CUDA
# graph (04).

# %%
# NBVAL_CHECK_OUTPUT
base, half = shown["upstream_fp32"], shown["bf16"]
print("bf16 alone slower than upstream fp32 on the H100:", half["t3_decode_tok_s"] < base["t3_decode_tok_s"])
print("bf16 peak memory lower by more than 0.5 GiB:", base["peak_vram_mib"] - half["peak_vram_mib"] > 512)
print("still one host launch per kernel:",
      abs(half["gpu_kernels_per_token"] - half["host_launches_per_token"]) < 1)

# %% [markdown]
# ## Is it the same model? Logits under teacher forcing
#
# A bf16 decoder (dynamic cache, as upstream) is fed the 24 reference tokens
# and its next-token logits are compared with the fp32 reference: the largest,
# over the 24 steps, of ‖bf16 − fp32‖ / ‖fp32‖.

# %%
decoder = T3Decoder(tts.t3, ("bf16",))
error = equivalence.relative_error(equivalence.forced_logits(decoder, tts.conds.t3, text_tokens, forced), reference)
print(f"relative logit error here: {error:.2e}")

# %%
# NBVAL_CHECK_OUTPUT
print("bf16 logits within tolerance:", error < equivalence.BF16_LOGIT_TOLERANCE)
print("tolerance:", equivalence.BF16_LOGIT_TOLERANCE)

# %% [markdown]
# The committed H100 run made the same checks on the full model, over 64
# tokens, for every rung:

# %%
# NBVAL_CHECK_OUTPUT
checks = results.latest_gpu_checks()
print("fp32 token identity with upstream:", checks["fp32_token_identity"])
print(f"bf16 relative logit error {checks['bf16_logit_rel_error']:.1e} "
      f"within {checks['bf16_logit_tolerance']}:", checks["bf16_within_tolerance"])

# %% [markdown]
# ## Listen
#
# The bf16 decoder in the full pipeline (two seconds of the synthetic model's
# babble: the point is that it runs end to end).

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Half the bytes, the same words.", decoder=T3Decoder(tts.t3, ladder_prefix("bf16")),
                    max_new_tokens=50)
print({stage: f"{s:.3f} s" for stage, s in speech.seconds.items()})
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())
print("audio seconds:", speech.audio_s)

# %% [markdown]
# Next: [02 · static KV cache](02_static_cache.ipynb) fixes the shapes and
# addresses of the attention cache, the precondition for a CUDA graph.
