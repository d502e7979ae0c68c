# %% [markdown]
# # 04 · Compile the step and replay it as a CUDA graph
#
# **The idea.** After 02 and 03 the one-token step is a fixed program: the
# same shapes every token, reading and writing the same device memory, with
# no Python values inside. That is what three parts of PyTorch need:
#
# - **Dynamo** (`torch.compile`) traces the step into one graph. With
#   `fullgraph=True` anything it cannot trace is an error instead of a silent
#   fall back to eager Python for part of the step.
# - **Inductor** fuses the many small elementwise operators of each layer
#   (norms, rotary embedding, SiLU and multiply, residual adds, the sampling
#   arithmetic) into fewer, generated kernels.
# - **CUDA graphs** (`mode="reduce-overhead"`): the fused step is recorded
#   once, kernels and addresses, and from then on replayed with **one launch**.
#   This is the change that answers notebook 00: the host stops paying a
#   launch per kernel, so it no longer sets the pace, and the bytes bf16 saved
#   (01) start to count.
#
# Sampling the token stays outside the graph (three small kernels) so that it
# draws from the global random generator exactly as upstream's
# `torch.multinomial` does: same seed, same tokens.
#
# **What it costs.** Compilation, tens of seconds when cold, paid once per
# process for each shape and dtype. And the step is specialised: a different
# cache capacity or dtype is a different program and compiles again. What
# must *not* recompile is everything that changes between requests: the
# speaker, the text, the sampling values. They are data in device tensors
# (the sampling values are 0-d tensors, not Python floats, which Dynamo would
# bake in as constants), so a new request changes data, not the program.
#
# On a CPU there are no CUDA graphs: `compile_step` uses Inductor's default
# mode there, so this notebook shows the compile costs and the recompile
# rules on the CPU, and the graph replay from the committed H100 profile.

# %%
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.measure import bench, equivalence, profiling
from chatterbox_lab.records import results
from chatterbox_lab.decode.compiled_step import compile_counters
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.registry import ladder_prefix
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.pipeline.voices import VoiceCache, voice_path

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Compile once, replay every token.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Same tokens as upstream (fp32)
#
# The compiled step with both caches, in fp32, against upstream with the same
# seed. This compiles the step once (for fp32), before T3 is cast to bf16.

# %%
identity = equivalence.token_identity(tts, text_tokens, [("static_cache", "embed_cache", "compiled")],
                                      n=24, seed=0, max_cache_len=256)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ## What compiling costs
#
# The full ladder (bf16, both caches, compiled) with a 256-slot cache. The
# first request traces, compiles and runs the step; the second only runs it.
# Inductor also keeps what it generates in an on-disk cache (under the temp
# directory by default), so on a machine that has compiled this step before
# the first call only re-traces and loads: well under a second for the tiny
# model, against tens of seconds with an empty cache (the H100's cold
# compile time is printed further down).

# %%
decoder = T3Decoder(tts.t3, ladder_prefix("compiled"), max_cache_len=256)  # casts T3 to bf16 in place
timings = {}
for call in ("first (compile + run)", "warm"):
    torch.manual_seed(0)
    start = time.perf_counter()
    decoder.generate(tts.conds.t3, text_tokens, 32)
    timings[call] = time.perf_counter() - start
print({call: f"{s:.2f} s" for call, s in timings.items()}, "for 32 tokens")

# %% [markdown]
# ## What recompiles, and what must not
#
# Dynamo counts every graph it compiles. After the warm-up above (and one
# request with each of two voices, so both are prepared), three requests
# change everything a service changes between requests: the speaker (through
# a cache of prepared voices), the text and its length, and every sampling
# value. The counters must not move.

# %%
voices = VoiceCache(tts)
for voice in ("alto", "tenor"):
    decoder.generate(voices.use(voice).t3, text_tokens, 8)
before = compile_counters()
requests = [
    ("tenor", "A much longer sentence, with many other words in it.", SamplingParams()),
    ("alto", "Short.", SamplingParams(temperature=0.5, cfg_weight=0.3, top_p=0.9)),
    ("tenor", "Compile once, replay every token.", SamplingParams(temperature=1.1, cfg_weight=0.7, top_p=0.8)),
]
for voice, text, sampling in requests:
    decoder.generate(voices.use(voice).t3, text_tokens_for(tts, text), 16, sampling)
after = compile_counters()
print("before:", before, "after:", after)

# %%
# NBVAL_CHECK_OUTPUT
print("speaker, text and sampling changes compiled nothing new:", after == before)
print("voices prepared:", voices.prepared_count)

# %% [markdown]
# A different cache capacity is a different program (every attention shape
# changes), so a decoder built with 320 slots compiles again. This is why the
# capacity is fixed per job (02) rather than sized per request.

# %%
resized = T3Decoder(tts.t3, ladder_prefix("compiled"), max_cache_len=320)
start = time.perf_counter()
resized.generate(tts.conds.t3, text_tokens, 8)
print(f"first request at 320 slots: {time.perf_counter() - start:.2f} s")
recompiled = compile_counters()["frames_compiled"] > after["frames_compiled"]

# %%
# NBVAL_CHECK_OUTPUT
print("new capacity compiled a new graph:", recompiled)

# %% [markdown]
# ## Measure on this machine
#
# The previous rung against the compiled one. The bench builds its own
# decoders; on this model its cache capacity works out to 256 slots, the
# shape compiled above, so the compiled step is reused and its `compile_s`
# here is close to zero: a new decoder with the same shapes compiles nothing.

# %%
local = bench.run(bench.BenchConfig(rungs=("embed_cache", "compiled"), tokens=32, repeats=2), tts=tts,
                  progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ## The whole ladder on an H100 (committed run)

# %%
h100 = results.latest_gpu_result()
rungs = h100["rungs"]
figures = ("t3_decode_tok_s", "e2e_s", "rtf", "peak_vram_mib", "compile_s", "gpu_kernels_per_token",
           "host_launches_per_token", "graph_launches_per_token")
display(Markdown(results.markdown_table({"rungs": rungs}, figures)))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
axes[0].bar(list(rungs), [r["t3_decode_tok_s"] for r in rungs.values()], color="tab:green")
axes[0].set_title("T3 tokens/s (H100)")
axes[0].tick_params(axis="x", rotation=20)
profiling.plot_counts(rungs, ax=axes[1])
axes[1].set_title("per token (H100)")
plt.tight_layout()
plt.show()

compiled, upstream = rungs["compiled"], rungs["upstream_fp32"]
print(f"compiled: {compiled['t3_decode_tok_s']:.0f} tokens/s, "
      f"{compiled['t3_decode_tok_s'] / upstream['t3_decode_tok_s']:.1f}x upstream; "
      f"end to end {compiled['e2e_s']:.2f} s for {compiled['audio_s']:.2f} s of audio; "
      f"cold compile {compiled['compile_s']:.0f} s")

# %% [markdown]
# **What the H100 shows.** An order of magnitude more tokens per second than
# upstream (figures above), and T3 is no longer most of the end-to-end time
# (S3Gen's flow now is). The counts say why: Inductor's fusion cut the GPU
# kernels per token to about a third, and the host launches are down to a
# handful: one graph launch for the whole step plus the three sampling
# kernels. The price is a cold compile of tens of seconds, paid once per
# process. The earlier rungs,
# each slower or no faster on its own, are what made this possible: bf16
# halves the bytes the replayed step reads, the static cache and the
# embedding cache give it one shape and no host inputs.

# %%
# NBVAL_CHECK_OUTPUT
print("one CUDA graph launch per token:", compiled["graph_launches_per_token"] == 1.0)
print("fewer than 5 host launches per token:", compiled["host_launches_per_token"] < 5)
print("fewer GPU kernels per token than upstream:", compiled["gpu_kernels_per_token"] < upstream["gpu_kernels_per_token"])
print("over 10x upstream's T3 rate:", compiled["t3_decode_tok_s"] > 10 * upstream["t3_decode_tok_s"])
checks = results.latest_gpu_checks()
print("fp32 token identity (compiled):", checks["fp32_token_identity"]["compiled+embed_cache+static_cache"])
print("bf16 logits within tolerance:", checks["bf16_within_tolerance"])

# %% [markdown]
# ## The timeline, before and after
#
# A few decode steps from each committed H100 trace (recorded under the
# profiler; each on its own time axis). Upstream: the GPU (green) runs a
# kernel, then waits for the host (blue) to launch the next. Compiled: the
# host launches a graph and the GPU runs its kernels back to back.

# %%
fig, axes = plt.subplots(2, 1, figsize=(10, 4.4))
busy = {}
for ax, name in zip(axes, ("upstream_fp32", "compiled")):
    trace = profiling.load_trace(f"../data/traces/h100/{name}.pt.trace.json.gz")
    window = profiling.decode_window(trace, 0.15)
    profiling.plot_timeline(trace, ax=ax, window=window, title=f"{name}, H100: a few decode steps")
    busy[name] = profiling.gpu_busy_fraction(trace, window)
plt.tight_layout()
plt.show()
print({name: f"GPU busy {b:.0%}" for name, b in busy.items()})

# %%
# NBVAL_CHECK_OUTPUT
print("GPU busier with the compiled step:", busy["compiled"] > busy["upstream_fp32"])

# %% [markdown]
# ## Listen
#
# The compiled decoder from above (the 256-slot step, already compiled) in
# the full pipeline.

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Compile once, replay every token.", decoder=decoder, max_new_tokens=50)
print({stage: f"{s:.3f} s" for stage, s in speech.seconds.items()})
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())
print("audio seconds:", speech.audio_s)

# %% [markdown]
# Next: reproducing the benchmark, on your own GPU.
