# %% [markdown]
# # 01 · bf16: half the bytes per weight
#
# The first rung of the ladder stores T3's weights in bfloat16 (bf16).
# It halves the memory, and on its own it makes upstream's loop *slower*.
# This notebook shows both, and why. Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - Why a decode step is bound by memory once the host stops setting its pace.
# - What bf16 keeps and loses against fp32, and how to check a model that no longer gives identical tokens.
# - Why a faster kernel does not help a loop that waits for the host.
#
# **Prerequisites:** [00 · the baseline](00_baseline.ipynb).
#
# **Runtime:** about a minute on a CPU; a few minutes on a GPU.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import show_code
from chatterbox_lab.decode import precision
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import bench, equivalence
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
from chatterbox_lab.records import report, results, spread
from chatterbox_lab.registry import ladder_prefix

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Half the bytes, the same words.")
print(f"device {tts.device}, preset {tts.preset}, T3 dtype {tts.t3.speech_head.weight.dtype}")

# %% [markdown]
# ## Why
#
# Decoding one token multiplies two vectors, the CFG pair, by every weight matrix of T3.
# That is two multiply-adds per weight, and each weight is read from memory once.
# In fp32 this is about 1 FLOP per byte read.
# An H100 can do about 300 FLOPs in the time it reads one byte of its memory.
# So when the GPU sets the pace of a step, memory bandwidth sets the GPU's pace.
# Storing the weights in bf16 halves the bytes: up to twice as fast per step, and about 1 GB less memory.
#
# **Why bf16 and not fp16.**
# bf16 keeps fp32's 8-bit exponent, so nothing that fits in fp32 overflows and no scaling is needed.
# Its significand has 8 bits, the leading one included.
# So rounding to bf16 changes a value by at most its unit roundoff, 2⁻⁸ ≈ 0.39 % of itself.
# Through 30 layers those roundings add up, and a sampled token can flip where two candidates were nearly tied.
# So bf16 is checked on **logits**, not tokens.
# Both models are fed the same token sequence (teacher forcing), and their next-token logits must agree within 5 %.
#
# **Why it may not help yet.**
# Notebook 00 showed that the host sets the pace of upstream's loop.
# Making each kernel faster does not make the host launch them faster.

# %% [markdown]
# ## The change
#
# The decoder casts T3 in place when its plan says bf16, where the device supports it.
# `weights_restored` undoes the cast exactly, so one process can measure fp32 and bf16 rungs in turn.

# %%
show_code(precision.supports, precision.t3_in_dtype, precision.weights_restored)

# %% [markdown]
# ## Proof
#
# ### Before casting: the fp32 reference
#
# The cast happens in place, so everything that needs the fp32 model runs first.
# The decoder with no step switched on must give exactly upstream's tokens for the same seed.
# Upstream's 24 sampled tokens and its fp32 logits for them are kept for the bf16 check below.

# %%
identity = equivalence.token_identity(tts, text_tokens, [()], n=24, seed=0)
forced = equivalence.seeded_tokens(tts, text_tokens, 24, 0)
reference = equivalence.reference_logits(tts, text_tokens, forced)
print("reference logits:", tuple(reference.shape), "(steps, CFG pair, vocabulary)")

# %%
# NBVAL_CHECK_OUTPUT
print("decoder without steps gives upstream's tokens:", identity)

# %% [markdown]
# ### Measure on this machine
#
# Upstream fp32 against the decoder with bf16 weights; the bench casts T3 in place after upstream's runs.
# On a CPU the tiny model's step is a few hundred small operators, so per-operator overhead sets the pace.
# These numbers show that the rung runs, not what it does on a GPU.

# %%
local = bench.run(bench.BenchConfig(rungs=("upstream_fp32", "bf16"), tokens=32, repeats=2), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ### Is it the same model? Logits under teacher forcing
#
# A bf16 decoder is fed the 24 reference tokens.
# Its error is the largest, over the 24 steps, of ‖bf16 − fp32‖ / ‖fp32‖ of the next-token logits.

# %%
decoder = T3Decoder(tts.t3, ("bf16",))  # T3 is bf16 already: the bench cast it
error = equivalence.relative_error(equivalence.forced_logits(decoder, tts.conds.t3, text_tokens, forced), reference)
print(f"relative logit error here: {error:.2e}")

# %%
# NBVAL_CHECK_OUTPUT
print("bf16 logits within tolerance:", error < equivalence.BF16_LOGIT_TOLERANCE)
print("tolerance:", equivalence.BF16_LOGIT_TOLERANCE)

# %% [markdown]
# ### On an H100: every committed record
#
# The rate is a median with its lowest and highest value across records.
# The speed-up is taken within each record, one process, then spread across records.

# %%
h100 = results.latest_gpu_result()
card = h100["provenance"]["gpu"]
display(Markdown(f"**{card}**, median (lowest–highest) across records\n\n" + report.spread_table(("upstream_fp32", "bf16"), card)))

records = spread.records_of("bf16", card)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, (key, label) in zip(axes, {"t3_decode_tok_s": "T3 tokens/s", "peak_vram_mib": "peak memory, MiB"}.items()):
    for i, rung in enumerate(("upstream_fp32", "bf16")):
        values = [doc["rungs"][rung][key] for _, doc in records]
        ax.scatter([i] * len(values), values, color=("tab:gray", "tab:orange")[i], s=30)
    ax.set_xticks([0, 1], ["upstream_fp32", "bf16"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_title(f"{label}, one dot per record")
plt.tight_layout()
plt.show()

# %% [markdown]
# Memory drops as expected: the peak falls by about half of T3's fp32 weights.
# Speed goes the *wrong* way, in every committed record.
# The step is still launched kernel by kernel from Python, so its time is the host's time.
# In an eager loop PyTorch sends bf16 attention to cuDNN, whose host overhead per call is larger.
# The bf16 step also launches more kernels per token.
# The bytes saved on the GPU are real, but the GPU was not what the loop waited for.
# They pay off once launches stop dominating: a step with fixed shapes (02, 03) replayed as a CUDA graph (04).

# %%
# NBVAL_CHECK_OUTPUT
paired = [doc["rungs"] for _, doc in records if "upstream_fp32" in doc["rungs"]]
print("bf16 alone slower than upstream fp32 in every record:",
      all(r["bf16"]["t3_decode_tok_s"] < r["upstream_fp32"]["t3_decode_tok_s"] for r in paired))
print("bf16 peak memory lower by more than 0.5 GiB in every record:",
      all(r["upstream_fp32"]["peak_vram_mib"] - r["bf16"]["peak_vram_mib"] > 512 for r in paired))
checks = results.latest_gpu_checks()
print(f"full model on the GPU, bf16 logits within {checks['bf16_logit_tolerance']}:", checks["bf16_within_tolerance"])

# %% [markdown]
# ### Listen
#
# The bf16 decoder in the full pipeline: it runs end to end.

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Half the bytes, the same words.", decoder=T3Decoder(tts.t3, ladder_prefix("bf16")),
                    max_new_tokens=50)
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())

# %% [markdown]
# ## Summary
#
# - bf16 halves the bytes per weight and keeps fp32's range; it rounds each value by at most 2⁻⁸ ≈ 0.39 %.
# - A bf16 model is checked on its logits under teacher forcing, since sampled tokens may flip at near ties.
# - On its own, bf16 makes upstream's host-bound loop slower in every committed H100 record; the saved bytes count only after launches stop dominating.
#
# ## Exercises
#
# **1. Check the unit roundoff.**
# Round a million random fp32 values to bf16 and back.
# The largest relative change should be at most 2⁻⁸, and close to it.

# %%
x = torch.randn(1_000_000)
worst = ((x.bfloat16().float() - x) / x).abs().max().item()
print(f"largest relative rounding error: {worst:.5f}; 2⁻⁸ = {2 ** -8:.5f}, 2⁻⁹ = {2 ** -9:.5f}")
assert 2 ** -9 < worst <= 2 ** -8

# %% [markdown]
# **2. Range: bf16 against fp16.**
# fp16 has more significand bits but a 5-bit exponent.
# Cast 70,000 to each format and see which one overflows.

# %%
big = torch.tensor(70_000.0)
print("fp16:", big.half().item(), "| bf16:", big.bfloat16().item())
assert torch.isinf(big.half()) and torch.isfinite(big.bfloat16())

# %% [markdown]
# **3. Longer teacher forcing.**
# Run the logit check over 48 tokens instead of 24 (you need the fp32 model: reload it with `load_tts()`).
# Does the error stay within the 5 % tolerance?
#
# Next: [02 · static KV cache](02_static_cache.ipynb) fixes the shapes and addresses of the attention cache.
