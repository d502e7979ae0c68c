# %% [markdown]
# # 02 · A static KV cache: shapes and addresses that never change
#
# This rung replaces upstream's growing attention cache with fixed buffers.
# It is not expected to be faster on its own: its value is what it makes possible in notebook 04.
# Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - What a KV cache is, and why a growing one stops a step from being recorded as a CUDA graph.
# - How fixed buffers, device positions and a mask give every step the same shapes and addresses.
# - How to read a comparison whose records disagree, and what a refused request looks like.
#
# **Prerequisites:** [01 · bf16](01_bf16.ipynb).
#
# **Runtime:** about a minute on a CPU; a few minutes on a GPU.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import show_code
from chatterbox_lab.decode.decoder import T3Decoder, prompt_len_for, text_tokens_for
from chatterbox_lab.decode.kv_cache import CacheOverflowError, StaticKVCache, cache_len_for, check_fits
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import bench, equivalence, profiling
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
from chatterbox_lab.records import results, spread
from chatterbox_lab.registry import ladder_prefix

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Fixed buffers, fixed addresses.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Why
#
# Attention at step *t* needs the keys and values of every earlier position.
# The KV cache keeps them, so each step computes only its own.
# Upstream keeps them in transformers' `DynamicCache`, which concatenates each new token's keys and values onto the old ones.
# So each step allocates 60 new buffers (keys and values of 30 layers).
# Attention runs on a sequence one longer than the step before, and every tensor lives at a new address.
#
# The fix for a host-bound loop is a **CUDA graph**: a recording of the step's kernels, with their exact shapes and memory addresses.
# A graph is replayed with a single launch.
# A step whose shapes and addresses change per token cannot be recorded once and replayed.
#
# The static cache gives each layer key and value buffers of a fixed capacity, allocated once.
# A step writes at its position, which is a device tensor, not a Python int.
# Attention reads every slot through a mask that hides the ones not yet written.
#
# **What it costs.** Memory for the whole capacity up front, and attention over every slot.
# Each layer also runs a few more small operators: the cache writes, the mask, the rotary tables gathered by position.
# In an eager loop, more operators means more host work.

# %% [markdown]
# ## The change
#
# Ours on the left, transformers' growing cache layer (what upstream uses) on the right.
# `update` writes in place with `index_copy_`; `mask` hides the slots past each position.
# `mark_static_address` tells the compiler that these buffers never move.

# %%
show_code(StaticKVCache, beside="transformers.cache_utils:DynamicLayer.update")

# %% [markdown]
# The capacity is chosen when the decoder is built, rounded up to a multiple of 64.
# A request that needs more slots is refused before anything runs.

# %%
show_code(cache_len_for, check_fits)

# %% [markdown]
# ## Proof
#
# ### Same tokens as upstream (fp32)
#
# With the model still in fp32, the static cache must sample exactly upstream's tokens for the same seed.
# The mask and the in-place writes change how attention is computed, not what it computes.

# %%
identity = equivalence.token_identity(tts, text_tokens, [("static_cache",)], n=24, seed=0)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ### Measure on this machine
#
# The previous rung (bf16) against bf16 with the static cache.

# %%
local = bench.run(bench.BenchConfig(rungs=("bf16", "static_cache"), tokens=32, repeats=2), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ### On an H100: the records disagree
#
# Each committed record measured bf16 and the static cache in one process.
# Their ratio cancels that process's host speed, so it is the fair comparison.
# One dot per record:

# %%
h100 = results.latest_gpu_result()
card = h100["provenance"]["gpu"]
paired = [(path, doc["rungs"]) for path, doc in spread.records_of("static_cache", card) if "bf16" in doc["rungs"]]
ratios = spread.of(r["static_cache"]["t3_decode_tok_s"] / r["bf16"]["t3_decode_tok_s"] for _, r in paired)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].scatter(range(len(paired)), [r["static_cache"]["t3_decode_tok_s"] / r["bf16"]["t3_decode_tok_s"] for _, r in paired])
axes[0].axhline(1.0, color="black", linewidth=0.8)
axes[0].set_xticks(range(len(paired)), [path.stem[-14:] for path, _ in paired], rotation=30, ha="right")
axes[0].set_title("static cache ÷ bf16, T3 tokens/s")
profiling.plot_counts({k: h100["rungs"][k] for k in ("upstream_fp32", "bf16", "static_cache")},
                       keys=("gpu_kernels_per_token", "cpu_ops_per_token"), ax=axes[1])
axes[1].set_title("per token, latest record")
plt.tight_layout()
plt.show()
display(Markdown(f"**{card}**, {ratios.records} records: the static cache runs at "
                 f"{ratios.text(suffix='x')} bf16's rate (median, lowest–highest)."))

# %% [markdown]
# Eagerly, the static cache lands on either side of bf16 (the figure above).
# That is the run-to-run spread of a host-bound loop, not an effect of the cache.
# No single record can say which way it goes; the median of all of them is what we quote.
#
# The kernel counts do not depend on the process, and they say what did change.
# Each layer adds two cache writes and two gathers from the rotary tables, and each step adds the mask.
# That is more kernels per token and hundreds more ATen operators on the host.
# Nothing is faster yet; what changed is that the step now has one shape and one set of addresses.

# %%
# NBVAL_CHECK_OUTPUT
print("records on both sides of bf16:", ratios.low < 1 < ratios.high)
print("more kernels per token than bf16 in every record:",
      all(r["static_cache"]["gpu_kernels_per_token"] > r["bf16"]["gpu_kernels_per_token"] for _, r in paired))
print("fp32 token identity on the H100:", results.latest_gpu_checks()["fp32_token_identity"]["static_cache"])

# %% [markdown]
# ### A request that does not fit
#
# A decoder with 64 slots is asked for 100 new tokens.
# It refuses before anything runs, and says what it needed and how to fix it.

# %%
small = T3Decoder(tts.t3, ladder_prefix("static_cache"), max_cache_len=64)
try:
    small.generate(tts.conds.t3, text_tokens, 100)
    overflow = "no error"
except CacheOverflowError as exc:
    overflow = f"{type(exc).__name__}: {exc}"

# %%
# NBVAL_CHECK_OUTPUT
print(overflow)

# %% [markdown]
# ### Listen

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Fixed buffers, fixed addresses.",
                    decoder=T3Decoder(tts.t3, ladder_prefix("static_cache")), max_new_tokens=50)
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())

# %% [markdown]
# ## Summary
#
# - A static cache gives each layer fixed key and value buffers, written in place at a device position and read through a mask.
# - Every step then has the same shapes and addresses, which a CUDA graph needs; the same tokens come out as upstream's.
# - Eagerly it gains nothing to count on: across committed records it lands on either side of bf16, within the spread of a host-bound loop.
#
# ## Exercises
#
# **1. Change the cache size.**
# How many slots does this request need, and how many bytes do they hold?
# Build decoders for twice and four times that capacity and check that the cache grows in proportion.

# %%
needed = cache_len_for(prompt_len_for(tts.t3, text_tokens), 100)
sizes = {slots: T3Decoder(tts.t3, ladder_prefix("static_cache"), max_cache_len=slots).forward.cache.nbytes()
         for slots in (needed, 2 * needed, 4 * needed)}
print({slots: f"{n / 2**20:.2f} MiB" for slots, n in sizes.items()})
assert sizes[4 * needed] == 2 * sizes[2 * needed] == 4 * sizes[needed]

# %% [markdown]
# **2. Addresses that never move.**
# Run one step's worth of `update` on a small cache and check the buffer's address before and after.
# Then do the same with `torch.cat`, as the growing cache does, and compare.

# %%
cache = StaticKVCache(n_layers=1, batch=2, n_kv_heads=2, capacity=8, head_dim=4, dtype=torch.float32, device="cpu")
address = cache.keys[0].data_ptr()
k = v = torch.ones(2, 2, 1, 4)
cache.update(0, torch.tensor([3]), k, v)
grown = torch.cat([torch.zeros(2, 2, 3, 4), k], dim=2)
print("static buffer kept its address:", cache.keys[0].data_ptr() == address,
      "| slot 3 written:", bool(cache.keys[0][:, :, 3].eq(1).all()))
assert cache.keys[0].data_ptr() == address

# %% [markdown]
# **3. Count the mask's cost.**
# Profile the static-cache decoder with `profiling.per_token_counts`, as notebook 00 did for upstream.
# How many more operators per token does it run than the decoder without steps?
#
# Next: [03 · embedding cache](03_embedding_cache.ipynb) removes the last piece of host data from the step.
