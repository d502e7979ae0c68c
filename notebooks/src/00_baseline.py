# %% [markdown]
# # 00 · The baseline: upstream Chatterbox, measured and profiled
#
# This notebook runs the unmodified upstream package (`chatterbox-tts` 0.1.7) and measures it.
# Every later notebook changes one thing and measures again.
# Words such as *rung*, *floor* and *CUDA graph* are defined in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - How Chatterbox turns text into speech, and which stage sets the pace.
# - How the bench measures T3's decode rate, and why it quotes a spread across records.
# - Why upstream's token loop leaves an H100 idle most of the time.
#
# **Prerequisites:** Python and a little PyTorch. No GPU is needed: GPU figures come from committed records.
#
# **Runtime:** about a minute on a CPU (the `tiny` preset); a few minutes on a GPU (the `full` preset).

# %%
import collections

import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import show_code
from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.loading.architecture import count_parameters
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import bench, profiling
from chatterbox_lab.measure.lab_bench import LabBench
from chatterbox_lab.pipeline.synthesis import synthesize, upstream_t3
from chatterbox_lab.records import results, spread
from chatterbox_lab.sampling import SamplingParams

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
print(f"device {tts.device}, preset {tts.preset}, T3 {count_parameters(tts.t3) / 1e6:.1f} M parameters, "
      f"S3Gen {count_parameters(tts.s3gen) / 1e6:.1f} M")

# %% [markdown]
# ## Why
#
# Chatterbox makes speech in two stages.
# **T3** is a 30-layer Llama with 0.5 B parameters.
# It writes *speech tokens* one at a time, 25 per second of audio.
# It runs each step on a batch of two, with and without the text: this is classifier-free guidance (CFG).
# **S3Gen** turns the tokens into a mel spectrogram, and HiFi-GAN turns that into a waveform.
#
# One T3 step reads all 0.5 B weights once, about 2 GB in fp32.
# An H100 reads that in under a millisecond.
# Yet upstream takes tens of milliseconds per token.
# The reason is the host, the CPU that drives the GPU.
# Each step runs over a thousand small GPU kernels, and Python launches each one separately.
# One launch costs the host several microseconds, so the GPU waits for the host.
#
# The model here is the **synthetic checkpoint**: upstream's own classes with random weights from a fixed seed.
# It is loaded by upstream's `ChatterboxTTS.from_local`.
# Speed does not depend on the weight values once the token count is fixed.
# A bias on the speech head keeps the synthetic model off the stop token, so every run has the same length.
# Point `load_tts` at a real checkpoint directory and everything below runs on real weights.

# %% [markdown]
# ## The change
#
# Nothing changes yet. This is the loop that every later notebook makes faster: upstream's `T3.inference`.
# Read it for three things.
# The cache grows by one position per token (`past_key_values`).
# The position comes from a Python int (`get_fixed_embedding(i + 1)`).
# The stop check reads a value back to the host per token.

# %%
show_code("chatterbox.models.t3.t3:T3.inference")

# %% [markdown]
# ## Proof
#
# ### Synthesize and listen
#
# `synthesize` runs upstream's stages in upstream's order and times each one.
# With random weights the audio is babble: what matters is its length and how long each stage takes.

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Every step of this workbook is measured.", voice="alto", max_new_tokens=50)
print({stage: f"{s:.3f} s" for stage, s in speech.seconds.items()})
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())
print("audio seconds:", speech.audio_s, "(25 tokens = 1 s)")

# %% [markdown]
# ### Measure on this machine
#
# `bench.run` warms up, then times repeated syntheses of a fixed text with a fixed token count.
# It synchronizes the device around each stage and reports medians (here one timed run: it checks the harness).
# The T3 rate is **speech tokens per second of decode**, prefill excluded.
# On a CPU these are the tiny model's numbers: they check the harness, not the speed.

# %%
local = bench.run(bench.BenchConfig(rungs=("upstream_fp32",), tokens=32, repeats=1), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ### On an H100: every committed record
#
# One record is one process on one card.
# Upstream's rate moves a lot from one process to the next, because the host sets its pace.
# So the rate is quoted as a median with the lowest and highest value across records.

# %%
h100 = results.latest_gpu_result()
card = h100["provenance"]["gpu"]
upstream_records = spread.records_of("upstream_fp32", card)
rate = spread.rung_spread("upstream_fp32", "t3_decode_tok_s", card)
display(Markdown(f"**{card}**, {len(upstream_records)} records: upstream decodes "
                 f"{rate.text(digits=3)} tokens/s (median, lowest–highest)."))
base = h100["rungs"]["upstream_fp32"]
display(Markdown(results.markdown_table({"rungs": {"upstream_fp32 (latest record)": base}})))

# %% [markdown]
# The kernel count is not noisy: the same step launches the same kernels in every process.
# Every record says the same thing: over a thousand kernels per token, each with its own host launch.

# %%
# NBVAL_CHECK_OUTPUT
counted = [doc["rungs"]["upstream_fp32"] for _, doc in upstream_records if "gpu_kernels_per_token" in doc["rungs"]["upstream_fp32"]]
print("more than 1,000 kernels per token in every record:", all(r["gpu_kernels_per_token"] > 1000 for r in counted))
print("one host launch per kernel in every record:",
      all(abs(r["gpu_kernels_per_token"] - r["host_launches_per_token"]) < 1 for r in counted))

# %% [markdown]
# ### The timeline
#
# A few decode steps from the committed H100 trace.
# It was recorded under the profiler, which slows the host further, so never time under it.
# Green is the GPU running kernels; blue is the host dispatching operators.
# The gaps in the green row are the GPU idle, waiting for the next launch.

# %%
trace = profiling.load_trace("../data/traces/h100/upstream_fp32.pt.trace.json.gz")
window = profiling.decode_window(trace, 0.15)
profiling.plot_timeline(trace, window=window, title="upstream fp32, H100: a few decode steps")
busy = profiling.gpu_busy_fraction(trace, window)
print(f"GPU busy {busy:.0%} of the time in this window")

# %%
# NBVAL_CHECK_OUTPUT
print("GPU idle most of the time (host-bound):", busy < 0.5)

# %% [markdown]
# ### Profile on this machine
#
# The same counters work on a CPU.
# There are no kernel launches there, so the profile counts ATen operators per token instead.
# Each one is a trip through PyTorch's dispatcher, the host cost that launches add to on a GPU.
# The counts are per extra token: two runs of different lengths, subtracted.

# %%
text_tokens = text_tokens_for(tts, "Count what one token costs.")
counts = profiling.per_token_counts(lambda n: upstream_t3(tts, text_tokens, n, SamplingParams()))
print({k: round(v, 1) for k, v in counts.items()})

# %%
# NBVAL_CHECK_OUTPUT
print("operators (or kernels) per token > 100:", max(counts["cpu_ops"], counts["gpu_kernels"]) > 100)

# %% [markdown]
# ## Summary
#
# - T3 writes speech tokens one at a time, and on a GPU its loop is the slow stage.
# - Upstream launches over a thousand kernels per token from Python, so the host, not the GPU, sets the pace.
# - Upstream's rate varies by about a factor of two across processes on one card, so every speed-up is quoted with its spread.
#
# ## Exercises
#
# **1. Count launches in the committed trace.**
# Count the host's kernel launches between two samplings in the trace above.
# Then open the same file in [Perfetto](https://ui.perfetto.dev) and find one step by eye.

# %%
launches = collections.Counter(e["name"] for e in trace["traceEvents"] if e.get("name") in profiling.RUNTIME_LAUNCHES)
sorts = [e["ts"] for e in trace["traceEvents"] if e.get("cat") == "kernel" and "RadixSortHistogram" in e["name"]]
one_step = sum(1 for e in trace["traceEvents"]
               if e.get("name") in profiling.RUNTIME_LAUNCHES and sorts[-2] <= e["ts"] < sorts[-1])
print(f"{sum(launches.values())} launches in the trace; {one_step} between the last two samplings")
assert one_step > 1000

# %% [markdown]
# **2. Per token is per token.**
# Change `short` and `long` of `per_token_counts` (say 4 and 40).
# The operators per token should not move: the prefill and the fixed costs cancel in the difference.

# %%
again = profiling.per_token_counts(lambda n: upstream_t3(tts, text_tokens, n, SamplingParams()), short=4, long=40)
print(f"cpu_ops per token: {counts['cpu_ops']:.1f} (8 and 24 tokens), {again['cpu_ops']:.1f} (4 and 40 tokens)")
assert abs(again["cpu_ops"] - counts["cpu_ops"]) < 0.05 * counts["cpu_ops"]

# %% [markdown]
# **3. The lab bench.**
# Pick a voice, a text, a token count and any set of steps, then press **Run**.
# Switching a step on also switches on the steps it needs.
# **Compare A / B** measures two step sets and gives the speed-up of B over A.
# Every run is a call of `lab_bench.measure`, a plain function you can also call yourself.
# Try upstream against the static cache with the embedding cache: with the same seed, are the tokens the same?

# %%
LabBench(tts)

# %% [markdown]
# Next: [01 · bf16](01_bf16.ipynb) halves the bytes per weight, and shows why that alone makes this loop *slower*.
