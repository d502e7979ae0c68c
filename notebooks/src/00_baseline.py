# %% [markdown]
# # 00 · The baseline: upstream Chatterbox, measured and profiled
#
# Chatterbox turns text into speech in two stages. **T3**, a 30-layer Llama
# (0.5 B parameters), writes *speech tokens* one at a time, 25 per second of
# audio, with classifier-free guidance (a batch of two: with and without the
# text). **S3Gen** turns those tokens into a mel spectrogram (a conformer and a
# flow-matching decoder, 10 steps) and HiFi-GAN turns that into a waveform.
#
# This notebook runs the unmodified upstream package (`chatterbox-tts` 0.1.7),
# measures it, and shows why its token loop is slow. Every later notebook
# changes one thing and measures again.
#
# The model here is the **synthetic checkpoint**: upstream's own classes with
# random weights from a fixed seed, written in the upstream file layout and
# loaded by upstream's `ChatterboxTTS.from_local`. Speed does not depend on the
# weight values once the token count is fixed; to keep it fixed, the synthetic
# model's speech head gets a bias that keeps it off the special tokens (upstream
# would stop at the first one it samples). Point `load_tts` at a real checkpoint
# directory and everything below runs on real weights.
#
# On a CPU this uses the `tiny` preset (same classes, small widths) so it runs
# in seconds; on a GPU the `full` one. GPU figures shown below come from the
# committed H100 run in `data/results/`.

# %%
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.measure import bench, profiling
from chatterbox_lab.records import results
from chatterbox_lab.loading.architecture import count_parameters
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
print(f"device {tts.device}, preset {tts.preset}, T3 {count_parameters(tts.t3) / 1e6:.1f} M parameters, "
      f"S3Gen {count_parameters(tts.s3gen) / 1e6:.1f} M")

# %% [markdown]
# ## Synthesize and listen
#
# `synthesize` runs upstream's stages in upstream's order (conditioning from a
# reference voice, T3, S3Gen's flow, HiFi-GAN, the Perth watermark) and times
# each one. With random weights the audio is noise-like babble: what matters
# here is its length and how long each stage takes.

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
# ## Measure the baseline on this machine
#
# `bench.run` warms up, then times repeated syntheses of a fixed text and voice
# with a fixed token count, synchronizing the device around each stage, and
# reports medians. The T3 rate is **speech tokens per second of decode**
# (prefill excluded), the figure the guide's "tokens/s" is not (it counted
# audio seconds × 50 and included S3Gen).

# %%
local = bench.run(bench.BenchConfig(rungs=("upstream_fp32",), tokens=32, repeats=2), tts=tts, progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ## The same on an H100 (committed run)

# %%
h100 = results.latest_gpu_result()
display(Markdown(f"**{h100['provenance']['gpu']}**, torch {h100['provenance']['torch']}, "
                 f"{h100['provenance']['tokens']} tokens"))
display(Markdown(results.markdown_table({"rungs": {"upstream_fp32": h100["rungs"]["upstream_fp32"]}})))
base = h100["rungs"]["upstream_fp32"]
print(f"T3 spends {base['stages_s']['t3']:.2f} s of {base['e2e_s']:.2f} s end to end "
      f"for {base['audio_s']:.2f} s of audio")

# %% [markdown]
# ## Why it is slow: one host launch per kernel, a thousand kernels per token
#
# Decoding one token with CFG reads all 0.5 B weights once, about 2 GB in
# fp32. An H100 moves that in under a millisecond, yet upstream takes tens of
# milliseconds per token (table above). The profile says why: every one of
# the more than a thousand kernels of a step is launched separately from Python (host launches = GPU kernels), and
# each launch costs the CPU several microseconds. The GPU waits for the CPU.

# %%
# NBVAL_CHECK_OUTPUT
print("kernels per token ≈ host launches per token:",
      abs(base["gpu_kernels_per_token"] - base["host_launches_per_token"]) < 1)
print("more than 1,000 kernels per token:", base["gpu_kernels_per_token"] > 1000)

# %% [markdown]
# The timeline of a few decode steps from the committed H100 trace (recorded
# under the profiler, which slows the host further; never time under it):
# green is the GPU running kernels, blue is the CPU dispatching operators.
# The gaps in the green row are the GPU idle, waiting for the next launch.

# %%
trace = profiling.load_trace("../data/traces/h100/upstream_fp32.pt.trace.json.gz")
window = profiling.decode_window(trace, 0.15)
profiling.plot_timeline(trace, window=window, title="upstream fp32, H100: a few decode steps")
busy = profiling.gpu_busy_fraction(trace, window)
print(f"GPU busy {busy:.0%} of the time in this window")

# %%
# NBVAL_CHECK_OUTPUT
print("GPU idle most of the time (CPU-bound):", busy < 0.5)

# %% [markdown]
# ## Profile on this machine
#
# The same counters work here. On a CPU there are no kernel launches, so the
# profile counts ATen operators per token instead: each one is a trip through
# PyTorch's dispatcher, the CPU-side cost that launches add to on a GPU. The
# counts are per extra token: two runs of different lengths, subtracted.

# %%
from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.pipeline.synthesis import upstream_t3
from chatterbox_lab.sampling import SamplingParams

text_tokens = text_tokens_for(tts, "Count what one token costs.")
counts = profiling.per_token_counts(lambda n: upstream_t3(tts, text_tokens, n, SamplingParams()))
print({k: round(v, 1) for k, v in counts.items()})

# %%
# NBVAL_CHECK_OUTPUT
print("operators (or kernels) per token > 100:", max(counts["cpu_ops"], counts["gpu_kernels"]) > 100)

# %% [markdown]
# ## The lab bench: try any set of steps
#
# The notebooks that follow switch the ladder's steps on one at a time. The lab
# bench lets you pick any set of them yourself: a voice, a text, a token count
# and the steps (switching a step on also switches on the steps it needs), then
# **Run** measures that configuration as the benchmark measures a rung: T3
# decode tokens/s, RTF, kernels and host launches per token on a GPU (operators
# per token on a CPU), peak memory, compile time, and the audio to listen to.
# **Compare A / B** measures two step sets and gives the speed-up of B over A.
# On a CPU with the `tiny` preset a run takes seconds, and its numbers check
# the harness, not the speed of the steps.

# %%
from IPython.display import HTML

from chatterbox_lab.measure.lab_bench import LabBench, measure, table_html

LabBench(tts)

# %% [markdown]
# Every run of the widget is a call of `measure`, a plain function. Called
# directly it shows what the fp32 steps change: how T3 runs, not what it says.
# With the same seed, the static cache and the embedding cache give upstream's
# speech tokens.

# %%
text = "Same seed, same tokens."
upstream = measure(tts, "alto", text, (), 16, repeats=1)
cached = measure(tts, "alto", text, ("static_cache", "embed_cache"), 16, repeats=1)
display(HTML(table_html({"upstream": upstream, "cached": cached})))
assert upstream.figures["tokens"] == cached.figures["tokens"] == 16
assert torch.equal(upstream.synthesis.speech_tokens, cached.synthesis.speech_tokens)

# %% [markdown]
# Next: [01 · bf16](01_bf16.ipynb) halves the bytes per weight, and shows
# why that alone makes this loop *slower* on an H100.
