# %% [markdown]
# # 04 · Compile the step and replay it as a CUDA graph
#
# This rung compiles the one-token step and replays it as a CUDA graph: one launch per token.
# It is the change that answers notebook 00, and the one the earlier rungs prepared.
# Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - What Dynamo, Inductor and CUDA graphs each do to a decode step.
# - What a compiled step must never recompile for, and how a 0-d tensor avoids it.
# - How to read the speed-up from committed records, with its spread.
#
# **Prerequisites:** [02 · static KV cache](02_static_cache.ipynb) and [03 · embedding cache](03_embedding_cache.ipynb).
#
# **Runtime:** about a minute on a CPU (compiles included); a few minutes on a GPU.

# %%
import collections
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import T3Decoder, show_code
from chatterbox_lab.decode.compiled_step import compile_counters, compile_step
from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import bench, equivalence, profiling, step_trace
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import VoiceCache, voice_path
from chatterbox_lab.records import report, results, spread
from chatterbox_lab.registry import ladder_prefix
from chatterbox_lab.sampling import SamplingParams

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Compile once, replay every token.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Why
#
# After 02 and 03 the one-token step is a fixed program.
# It has the same shapes per token, reads and writes the same device memory, and holds no Python values.
# That is what three parts of PyTorch need:
#
# - **Dynamo** (`torch.compile`) traces the step into one graph. With `fullgraph=True`, anything it cannot trace is an error, never a silent fall-back to Python.
# - **Inductor** fuses the many small operators of each layer (norms, rotary embedding, SiLU, residual adds) into fewer generated kernels.
# - **CUDA graphs** record the fused step once, kernels and addresses, and replay it with **one launch**.
#
# The host stops paying a launch per kernel, so it no longer sets the pace.
# Then the bytes that bf16 saved (01) start to count.
#
# Sampling stays outside the graph in this rung, as three small kernels.
# It draws from the global random generator exactly as upstream's `torch.multinomial` does: same seed, same tokens.
#
# **What it costs.** A compile of tens of seconds when cold, paid once per process for each shape and dtype.
# A different cache capacity or dtype is a different program and compiles again.
# What changes between requests must *not* recompile: the speaker, the text and the sampling values.
# They are data in device tensors.
# The sampling values are 0-d tensors, not Python floats, which Dynamo would bake in as constants.
#
# On a CPU there are no CUDA graphs, so `compile_step` uses Inductor's default mode there.
# This notebook shows the compile costs and the recompile rules on the CPU, and the graph replay from committed H100 records.

# %% [markdown]
# ## The change
#
# `compile_step` compiles the decoder's step function.
# Beside it, upstream's loop: compare its per-token work with our step, which reads only device state.

# %%
show_code(compile_step, T3Decoder._feed_last, beside="chatterbox.models.t3.t3:T3.inference")

# %% [markdown]
# ## Proof
#
# ### Same tokens as upstream (fp32)
#
# The compiled step with both caches, in fp32, against upstream with the same seed.
# This compiles the step once, for fp32, before T3 is cast to bf16.

# %%
identity = equivalence.token_identity(tts, text_tokens, [("static_cache", "embed_cache", "compiled")],
                                      n=24, seed=0, max_cache_len=256)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ### What compiling costs
#
# The full ladder with a 256-slot cache: the first request compiles and runs the step, the second only runs it.
# Inductor keeps what it generates in an on-disk cache.
# On a machine that has compiled this step before, the first call only re-traces and loads.

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
# ### What must not recompile
#
# Dynamo counts every graph it compiles.
# After a warm-up with each of two voices, three requests change the speaker, the text and its length, and every sampling value.
# The counters must not move.

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

# %% [markdown]
# ### Measure on this machine
#
# The previous rung against the compiled one.
# The bench's cache works out to 256 slots on this model, the shape compiled above, so its `compile_s` is near zero.

# %%
local = bench.run(bench.BenchConfig(rungs=("embed_cache", "compiled"), tokens=32, repeats=1), tts=tts,
                  progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ### On an H100: every committed record
#
# The speed-up is taken within each record, one process, and then spread across records.
# Upstream's host-bound rate moves by a factor of two between processes, while the compiled rate barely moves.
# So the speed-up's spread is mostly upstream's.

# %%
h100 = results.latest_gpu_result()
card = h100["provenance"]["gpu"]
display(Markdown(f"**{card}**, median (lowest–highest) across records\n\n" + report.spread_table(("upstream_fp32", "bf16", "static_cache", "embed_cache", "compiled"), card)))

rungs = h100["rungs"]
fig, ax = plt.subplots(figsize=(8, 3.2))
profiling.plot_counts({k: rungs[k] for k in ("upstream_fp32", "bf16", "static_cache", "embed_cache", "compiled")}, ax=ax)
ax.set_title("per token, latest record")
plt.tight_layout()
plt.show()

# %% [markdown]
# T3 decodes an order of magnitude more tokens per second than upstream.
# The counts say why.
# Inductor's fusion cut the GPU kernels per token to about a third of the rung before.
# The host launches are down to a handful: one graph launch for the whole step, plus the sampling kernels.
# The earlier rungs, each slower or no faster on its own, made this possible.

# %%
# NBVAL_CHECK_OUTPUT
compiled_records = [doc["rungs"]["compiled"] for _, doc in spread.records_of("compiled", card)]
speedup = spread.speedup_spread("compiled", card)
print("one CUDA graph launch per token in every record:",
      all(r["graph_launches_per_token"] == 1.0 for r in compiled_records if "graph_launches_per_token" in r))
launches = spread.of(r["host_launches_per_token"] for r in compiled_records if "host_launches_per_token" in r)
print("fewer than 5 host launches per token in the median record:", launches.median < 5)
print("more than 5x upstream's T3 rate in every record:", speedup.low > 5)
checks = results.latest_gpu_checks()
print("fp32 token identity on the H100 (compiled):", checks["fp32_token_identity"]["compiled+embed_cache+static_cache"])

# %% [markdown]
# ### The timeline, before and after
#
# Two decode steps from each committed H100 trace, on one time axis.
# Black lines mark where each step begins.
# Both were recorded under the profiler, which slows the host, so compare them with each other, not with the rates above.
# Upstream's GPU runs a kernel, then waits for the host to launch the next.
# The compiled step's kernels run back to back, and the two steps fit in a sliver of one upstream step.

# %%
traces = {name: profiling.load_trace(f"../data/traces/h100/{name}.pt.trace.json.gz") for name in ("upstream_fp32", "compiled")}
step_trace.plot_steps(traces, steps=2, title="two decode steps per trace, H100, one time axis")
plt.show()
lengths = {name: step_trace.step_lengths_us(trace) for name, trace in traces.items()}
print({name: f"{sum(ls) / len(ls) / 1e3:.1f} ms per step under the profiler" for name, ls in lengths.items()})

# %%
# NBVAL_CHECK_OUTPUT
print("compiled steps shorter than upstream's:", max(lengths["compiled"]) < min(lengths["upstream_fp32"]))

# %% [markdown]
# ### Listen
#
# The compiled decoder from above in the full pipeline.

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Compile once, replay every token.", decoder=decoder, max_new_tokens=50)
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())

# %% [markdown]
# ## Summary
#
# - The compiled step is traced by Dynamo, fused by Inductor and replayed as one CUDA graph: one launch per token instead of over a thousand.
# - Speaker, text and sampling values are device data, so changing them recompiles nothing; a new cache capacity or dtype does.
# - Across committed H100 records the compiled rung is an order of magnitude faster than upstream, with a spread that comes from upstream's host-bound rate.
#
# ## Exercises
#
# **1. Pass a sampling value as a Python float.**
# Dynamo bakes a Python float into the graph as a constant, so a second value compiles a second graph.
# After that recompile Dynamo turns the float into a symbol, and later values reuse the second graph.
# A 0-d tensor is data from the start: one graph serves every value.
# The `eager` backend keeps this fast: it traces like `torch.compile` but generates no code.

# %%
def scaled(logits, temperature):
    return logits / temperature


logits = torch.randn(8)
graphs = {}
for kind, wrap in (("Python float", float), ("0-d tensor", torch.tensor)):
    torch._dynamo.reset()
    step = torch.compile(scaled, backend="eager", fullgraph=True)
    start = compile_counters()["frames_compiled"]
    for temperature in (0.5, 0.8, 1.1):
        step(logits, wrap(temperature))
    graphs[kind] = compile_counters()["frames_compiled"] - start
print("graphs compiled for three temperatures:", graphs)
assert graphs["0-d tensor"] == 1 < graphs["Python float"]

# %% [markdown]
# **2. Change the cache size.**
# Every attention shape depends on the capacity, so a decoder with 320 slots compiles again.
# This is why the capacity is fixed per job (02) rather than sized per request.

# %%
before = compile_counters()["frames_compiled"]
T3Decoder(tts.t3, ladder_prefix("compiled"), max_cache_len=320).generate(tts.conds.t3, text_tokens, 8)
print("graphs compiled for a new capacity:", compile_counters()["frames_compiled"] - before)
assert compile_counters()["frames_compiled"] > before

# %% [markdown]
# **3. Count launches in the committed trace.**
# In the compiled trace, count the host's graph launches and kernel launches per step.
# Then open the file in [Perfetto](https://ui.perfetto.dev) and find a `cudaGraphLaunch` and the kernels it ran.

# %%
compiled_trace = traces["compiled"]
starts = step_trace.step_boundaries(compiled_trace)
names = collections.Counter(e["name"] for e in compiled_trace["traceEvents"]
                            if starts[0] <= e.get("ts", -1) < starts[-1] and e.get("cat") in ("cuda_runtime", "cuda_driver"))
per_step = {name: names[name] / (len(starts) - 1) for name in ("cudaGraphLaunch", "cudaLaunchKernel")}
print(f"{len(starts) - 1} whole steps; per step:", per_step)
assert per_step["cudaGraphLaunch"] == 1

# %% [markdown]
# Next: [05 · reproduce the benchmark](05_reproduce.ipynb), on your own GPU, next to the guide's figures.
