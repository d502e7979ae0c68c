# %% [markdown]
# # 03 · Embedding cache: a step made of device data only
#
# This rung builds each step's input embedding from device tensors alone.
# Like the static cache, it is a change in kind, not in speed: it makes the step recordable.
# Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - Why a Python int inside a step stops it from being replayed as a CUDA graph.
# - How two table lookups with device indices replace a host-to-device copy per token.
# - How to see host-to-device copies in a trace.
#
# **Prerequisites:** [02 · static KV cache](02_static_cache.ipynb).
#
# **Runtime:** about a minute on a CPU; a few minutes on a GPU.

# %%
import collections

import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import show_code
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.embed_cache import SpeechEmbeddingCache, upstream_step_embedding
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import bench, equivalence, profiling
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
from chatterbox_lab.records import results, spread
from chatterbox_lab.registry import ladder_prefix

tts = load_tts()  # synthetic checkpoint: full on a GPU, tiny on a CPU
tts.prepare_conditionals(str(voice_path("alto")))
text_tokens = text_tokens_for(tts, "Two lookups, no copies.")
print(f"device {tts.device}, preset {tts.preset}")

# %% [markdown]
# ## Why
#
# Each decode step starts by embedding the token just sampled.
# Upstream adds the token's embedding and the embedding of its position `i + 1`.
# The position is a Python int, and `get_fixed_embedding` turns it into a new device tensor.
# That is a host-to-device copy per token, issued by the host and waited for by the step.
# The result is then concatenated with itself for the CFG pair, another copy.
#
# A CUDA graph records kernels and the memory they read, not Python values.
# A step that takes its position from the host cannot be replayed.
# The recorded copy would bring in the position of the step it was recorded at, every time.
# The static cache (02) already made the attention positions a device tensor.
# This rung does the same for the input embedding.
# The whole step then reads only device state: the sampled tokens, the step counter and the cache.
# One recording can serve every token.
#
# Eagerly this saves one small copy and a few host operators per token, out of thousands.
# No visible speed-up is expected on its own.

# %% [markdown]
# ## The change
#
# Ours on the left: both tables are indexed with device tensors, added, and *expanded* to the CFG pair.
# An expanded tensor is a view, not a copy.
# On the right, upstream's position lookup, with its `torch.tensor(idx, device=device)` per call.

# %%
show_code(SpeechEmbeddingCache, beside="chatterbox.models.t3.modules.learned_pos_emb:LearnedPositionEmbeddings.get_fixed_embedding")

# %% [markdown]
# ## Proof
#
# ### Same tokens as upstream (fp32)
#
# The embedding cache alone, and together with the static cache, against upstream with the same seed.

# %%
identity = equivalence.token_identity(tts, text_tokens, [("embed_cache",), ("static_cache", "embed_cache")],
                                      n=24, seed=0)

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens as upstream:", identity)

# %% [markdown]
# ### Measure on this machine
#
# The previous rung (bf16 with the static cache) against the same with the embedding cache.

# %%
local = bench.run(bench.BenchConfig(rungs=("static_cache", "embed_cache"), tokens=32, repeats=1), tts=tts,
                  progress=False)
display(Markdown(bench.summary_table(local)))

# %% [markdown]
# ### On an H100: every committed record
#
# The ratio of the two rungs within each record, then its spread across records:

# %%
h100 = results.latest_gpu_result()
card = h100["provenance"]["gpu"]
paired = [doc["rungs"] for _, doc in spread.records_of("embed_cache", card) if "static_cache" in doc["rungs"]]
ratio = spread.of(r["embed_cache"]["t3_decode_tok_s"] / r["static_cache"]["t3_decode_tok_s"] for r in paired)
display(Markdown(f"**{card}**, {ratio.records} records: the embedding cache runs at "
                 f"{ratio.text(suffix='x')} the static cache's rate (median, lowest–highest)."))
figures = ("t3_decode_tok_s", "gpu_kernels_per_token", "host_launches_per_token", "cpu_ops_per_token")
display(Markdown(results.markdown_table({"rungs": {k: h100["rungs"][k] for k in ("static_cache", "embed_cache")}},
                                        figures)))

# %% [markdown]
# The kernel count barely moves: a host-to-device copy is not a kernel.
# The host runs a few fewer operators per token, out of thousands.
# The rates land on either side from one record to the next.
# A difference this small between two rungs that do nearly the same work is within the host's noise.
#
# The copies are visible in the committed traces: 8-token profiled runs, prefill included.
# Upstream's loop is compared with the compiled step of notebook 04, which has this change and the static cache.

# %%
def host_to_device_copies(name):
    trace = profiling.load_trace(f"../data/traces/h100/{name}.pt.trace.json.gz")
    kinds = collections.Counter(e["name"] for e in trace["traceEvents"] if e.get("cat") == "gpu_memcpy")
    return sum(n for kind, n in kinds.items() if kind.startswith("Memcpy HtoD"))


copies = {name: host_to_device_copies(name) for name in ("upstream_fp32", "compiled")}
print("host-to-device copies in an 8-token trace:", copies)

# %%
# NBVAL_CHECK_OUTPUT
print("kernels per token within one of the static cache's, in every record:",
      all(abs(r["static_cache"]["gpu_kernels_per_token"] - r["embed_cache"]["gpu_kernels_per_token"]) <= 1 for r in paired))
print("fewer host operators per token in every record:",
      all(r["embed_cache"]["cpu_ops_per_token"] < r["static_cache"]["cpu_ops_per_token"] for r in paired))
print("fewer host-to-device copies once the step is device-only:", copies["compiled"] < copies["upstream_fp32"])
print("fp32 token identity on the H100:",
      {k: results.latest_gpu_checks()["fp32_token_identity"][k] for k in ("embed_cache", "embed_cache+static_cache")})

# %% [markdown]
# ### Listen

# %%
torch.manual_seed(0)
speech = synthesize(tts, "Two lookups, no copies.", decoder=T3Decoder(tts.t3, ladder_prefix("embed_cache")),
                    max_new_tokens=50)
Audio(speech.wav, rate=speech.sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
print("speech tokens:", speech.speech_tokens.numel())

# %% [markdown]
# ## Summary
#
# - Upstream copies a Python int to the device per token for the position embedding, which a CUDA graph cannot replay.
# - The embedding cache indexes both tables with device tensors and expands the result to the CFG pair as a view.
# - The step now reads only device state; its speed moves within the host's noise, since it saves a copy out of thousands of operations per token.
#
# ## Exercises
#
# **1. The same numbers.**
# Check that the cache's embedding equals upstream's for a few tokens and positions.

# %%
cache = SpeechEmbeddingCache(tts.t3)
token = torch.tensor([[7]], device=tts.device)
for position in (1, 5, 40):
    ours = cache(token, torch.tensor([position], device=tts.device))
    assert torch.equal(ours, upstream_step_embedding(tts.t3, token, position)), position
print("same embeddings as upstream at positions 1, 5 and 40")

# %% [markdown]
# **2. A view, not a copy.**
# For one utterance, both rows of the CFG pair share the memory of one embedding.
# Check it with `data_ptr` and the stride of the batch dimension.

# %%
pair = cache(token, torch.tensor([5], device=tts.device))
print("rows:", pair.shape[0], "| batch stride:", pair.stride(0), "| same memory:", pair[0].data_ptr() == pair[1].data_ptr())
assert pair.stride(0) == 0

# %% [markdown]
# **3. Why not one big table?**
# A table indexed by (position, token) would need no addition at all.
# Work out its size for the full model: 8,194 tokens, 1,024 values each, in bf16, for 256 positions.
# Compare it with the two tables the cache reads.
#
# Next: [04 · compile and CUDA graphs](04_compile.ipynb) records the step once and replays it with one launch per token.
