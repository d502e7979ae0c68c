# %% [markdown]
# # 02 · A static KV cache: shapes and addresses that never change
#
# **The problem.** Upstream keeps each layer's attention keys and values in
# transformers' `DynamicCache`, which concatenates every new token's keys and
# values onto the old tensors. Each step therefore allocates 60 new buffers
# (keys and values of 30 layers), attention runs on a sequence one longer than
# the step before, and every tensor lives at a new address. Eagerly that is
# fine. But the fix for a host-bound loop is a **CUDA graph**: a recording of
# the step's kernels, with their exact shapes and memory addresses, replayed
# with a single launch. A step whose shapes and addresses change every token
# cannot be recorded once and replayed.
#
# **The change.** Each layer gets key and value buffers of a fixed capacity,
# allocated once. A step writes its keys and values at its position with
# `index_copy_` (the position is a device tensor, not a Python int), and
# attention reads all slots through a mask that hides the ones not yet
# written. Every step then has the same shapes and touches the same memory.
#
# **What it costs.** Memory for the whole capacity up front; attention over
# every slot instead of the filled ones; and a few more small operators per
# layer (the cache writes, the mask, the rotary tables gathered by position).
# So this step is *not* expected to be faster on its own: in an eager loop,
# more operators means more host work. Its value is what it makes possible
# (notebook 04). The capacity is fixed for a job, and a request that would
# not fit is refused with a message, never silently truncated.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.measure import bench, equivalence, profiling
from chatterbox_lab.records import results
from chatterbox_lab.decode.decoder import T3Decoder, prompt_len_for, text_tokens_for
from chatterbox_lab.registry import ladder_prefix
from chatterbox_lab.decode.kv_cache import CacheOverflowError, cache_len_for
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Fixed buffers, fixed addresses.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Same tokens as upstream (fp32)
#
# With the model still in fp32, a decoder with only the static cache must
# sample exactly upstream's tokens for the same seed: the mask and the
# in-place writes change how attention is computed, not what it computes.
# (Before the bench below, which casts T3 to bf16 in place.)

# %%
identity = equivalence.token_identity(tts, text_tokens, [("static_cache",)], n=24, seed=0)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ## Measure on this machine
#
# The previous rung (bf16) against bf16 with the static cache.

# %%
local = bench.run(bench.BenchConfig(rungs=("bf16", "static_cache"), tokens=32, repeats=2), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ## The same on an H100 (committed run)

# %%
h100 = results.latest_gpu_result()
shown = {k: h100["rungs"][k] for k in ("bf16", "static_cache")}
figures = ("t3_decode_tok_s", "peak_vram_mib", "kv_cache_mib", "gpu_kernels_per_token",
           "host_launches_per_token", "cpu_ops_per_token")
display(Markdown(results.markdown_table({"rungs": shown}, figures)))

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].bar(list(shown), [r["t3_decode_tok_s"] for r in shown.values()], color=["tab:orange", "tab:blue"])
axes[0].set_title("T3 tokens/s (H100)")
profiling.plot_counts(shown, keys=("gpu_kernels_per_token", "cpu_ops_per_token"), ax=axes[1])
axes[1].set_title("per token (H100)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the H100 shows.** Eagerly, the static cache is no real gain over bf16
# alone: the committed runs put it on either side, within the run-to-run
# spread of a host-bound loop. The profile says why: more kernels per token
# (in each of the 30 layers, two cache writes and two gathers from the rotary
# tables; once per step, the mask) and hundreds more ATen operators on the
# host, each a trip
# through the dispatcher, in a loop whose pace the host sets. Attending over
# the whole capacity costs the GPU a little more too, but the GPU was idle
# most of the time anyway. The cache itself is allocated once, for the job's
# capacity. Nothing here is faster yet; what
# changed is that the step now has one shape and one set of addresses.

# %%
# NBVAL_CHECK_OUTPUT
bf16, static, compiled = shown["bf16"], shown["static_cache"], h100["rungs"]["compiled"]
print("static cache alone still launch-bound on the H100 (under a quarter of the compiled rate):",
      static["t3_decode_tok_s"] < compiled["t3_decode_tok_s"] / 4)
print("more kernels per token than bf16 eager:", static["gpu_kernels_per_token"] > bf16["gpu_kernels_per_token"])
print("fp32 token identity on the H100:", results.latest_gpu_checks()["fp32_token_identity"]["static_cache"])

# %% [markdown]
# ## A request that does not fit
#
# The capacity is chosen when the decoder is built (`max_cache_len`; by
# default from the longest text and token count it must serve, rounded up to
# a multiple of 64). A request that needs more slots than that is refused
# before anything runs, with what it needed and how to fix it. Here a decoder
# with 64 slots is asked for 100 new tokens.

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

# %%
needed = cache_len_for(prompt_len_for(tts.t3, text_tokens), 100)
fits = T3Decoder(tts.t3, ladder_prefix("static_cache"), max_cache_len=needed)
print(f"{needed} slots: {fits.forward.cache.nbytes() / 2**20:.2f} MiB of cache on this model")

# %% [markdown]
# ## Listen

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Fixed buffers, fixed addresses.",
                    decoder=T3Decoder(tts.t3, ladder_prefix("static_cache")), max_new_tokens=50)
print({stage: f"{s:.3f} s" for stage, s in speech.seconds.items()})
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())
print("audio seconds:", speech.audio_s)

# %% [markdown]
# Next: [03 · embedding cache](03_embedding_cache.ipynb) removes the last piece
# of host data from the step.
