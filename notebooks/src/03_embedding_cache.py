# %% [markdown]
# # 03 · Embedding cache: a step made of device data only
#
# **The problem.** Each decode step starts by embedding the token just
# sampled. Upstream does it as `speech_emb(token) +
# speech_pos_emb.get_fixed_embedding(i + 1)`, and the second term turns the
# Python int `i + 1` into a new tensor on the device: a host-to-device copy
# every token, issued by the host and waited for by the step. Then the result
# is concatenated with itself for the CFG pair, another copy.
#
# **Why that matters more than one copy.** A CUDA graph records kernels and
# the memory they read, not Python values. A step that takes its position
# from the host cannot be replayed: the recorded copy would bring in the
# position of the step it was recorded at, every time. With the static cache
# (02) the attention positions are already a device tensor; this step does
# the same for the input embedding, so the whole step becomes a function of
# device state (the sampled tokens, the step counter, the cache) and one
# recording can serve every token.
#
# **The change.** Both embedding tables are indexed with device tensors (the
# token read from the decoder's token buffer, the position from its step
# counter), added, and *expanded* to the CFG batch, a view rather than a
# copy. It is a cache in the sense that it reads the model's own tables in
# place; a precomputed (position × token) table would hold the same numbers
# in over 4 GB.
#
# Eagerly this saves one small copy and a few host operators per token out
# of thousands, so no visible speed-up is expected on its own.

# %%
import collections

import matplotlib.pyplot as plt
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.measure import bench, equivalence, profiling
from chatterbox_lab.records import results
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.registry import ladder_prefix
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Two lookups, no copies.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Same tokens as upstream (fp32)
#
# The embedding cache alone and together with the static cache, against
# upstream, same seed, before the bench casts T3 to bf16.

# %%
identity = equivalence.token_identity(tts, text_tokens, [("embed_cache",), ("static_cache", "embed_cache")],
                                      n=24, seed=0)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ## Measure on this machine
#
# The previous rung (bf16 with the static cache) against the same with the
# embedding cache.

# %%
local = bench.run(bench.BenchConfig(rungs=("static_cache", "embed_cache"), tokens=32, repeats=2), tts=tts,
                  progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ## The same on an H100 (committed run)

# %%
h100 = results.latest_gpu_result()
shown = {k: h100["rungs"][k] for k in ("static_cache", "embed_cache")}
figures = ("t3_decode_tok_s", "gpu_kernels_per_token", "host_launches_per_token", "cpu_ops_per_token")
display(Markdown(results.markdown_table({"rungs": shown}, figures)))

tokens = h100["provenance"]["tokens"]
per_repeat = {k: [tokens / s for s in r["raw"]["t3_decode_s"]] for k, r in shown.items()}
fig, ax = plt.subplots(figsize=(6, 3))
for i, (name, rates) in enumerate(per_repeat.items()):
    ax.scatter([i] * len(rates), rates, s=40, label=name)
    ax.hlines(shown[name]["t3_decode_tok_s"], i - 0.2, i + 0.2, color="black")
ax.set_xticks(range(len(per_repeat)), list(per_repeat))
ax.set_xlim(-0.6, len(per_repeat) - 0.4)
ax.set_ylabel("T3 tokens/s")
ax.set_title("each timed repeat on the H100 (line: median)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the H100 shows.** The kernel count does not move (a host-to-device
# copy is not a kernel), and the host does a few fewer operators per token
# out of thousands. The medians differ, in either direction from one
# committed run to the next, and the repeats scatter over a similar range: the eager loop's speed is at
# the mercy of the host, and a difference this size between two rungs that
# do nearly the same work is within that noise. Read this rung as a change
# in *kind*, not in speed: the step's inputs are now all on the device.
#
# The host-to-device copies are visible in the committed traces (8-token
# profiled runs, prefill included): upstream's loop against the compiled
# step of notebook 04, which has this change and the static cache.

# %%
copies = {}
for name in ("upstream_fp32", "compiled"):
    trace = profiling.load_trace(f"../data/traces/h100/{name}.pt.trace.json.gz")
    events = collections.Counter(e["name"] for e in trace["traceEvents"] if e.get("cat") == "gpu_memcpy")
    copies[name] = sum(n for kind, n in events.items() if kind.startswith("Memcpy HtoD"))
print("host-to-device copies in an 8-token trace:", copies)

# %%
# NBVAL_CHECK_OUTPUT
static, cached = shown["static_cache"], shown["embed_cache"]
print("same kernels per token as the static cache:", static["gpu_kernels_per_token"] == cached["gpu_kernels_per_token"])
print("fewer host operators per token:", cached["cpu_ops_per_token"] < static["cpu_ops_per_token"])
print("fewer host-to-device copies once the step is device-only:", copies["compiled"] < copies["upstream_fp32"])
print("fp32 token identity on the H100:",
      {k: results.latest_gpu_checks()["fp32_token_identity"][k] for k in ("embed_cache", "embed_cache+static_cache")})

# %% [markdown]
# ## Listen

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Two lookups, no copies.", decoder=T3Decoder(tts.t3, ladder_prefix("embed_cache")),
                    max_new_tokens=50)
print({stage: f"{s:.3f} s" for stage, s in speech.seconds.items()})
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())
print("audio seconds:", speech.audio_s)

# %% [markdown]
# Next: [04 · compile and CUDA graphs](04_compile.ipynb) records the step once
# and replays it with a single launch per token.
