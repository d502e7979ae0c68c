# %% [markdown]
# # 06d · Many utterances per step: one read of the weights, many tokens
#
# ## What you will learn
#
# - Why decoding several utterances in one step raises the total rate far more than it slows each
#   utterance.
# - How a batched decoder keeps each utterance's own prompt, position, repetition mask and stop.
# - Why the KV cache, not the weights, sets the step's time once the batch is large.
#
# **Prerequisites:** [06a](06a_fused_kernels.ipynb) and [06b](06b_owning_the_graph.ipynb). Notebook
# [08](08_streaming_and_batching.ipynb) runs whole syntheses of many utterances; this chapter looks
# at T3's decode step alone. Words such as *floor* and *rung* are in the
# [glossary](../docs/glossary.md).
#
# **Runtime:** about 30 s on a CPU (tiny model). On a GPU the same: the measurements come from
# committed H100 records.

# %%
import torch
from IPython.display import Markdown, display

import chatterbox_lab as lab
from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.kernels import fused_matvec
from chatterbox_lab.pipeline.voices import VoiceCache
from chatterbox_lab.records import chapters, report, results
from chatterbox_lab.source import show_code

# %% [markdown]
# ## Why
#
# One utterance's decode step reads every weight of T3 once, about 1 GB, to multiply two rows: the
# CFG pair. The arithmetic per byte is tiny, so the step is bound by memory. A second utterance
# adds two rows to the same matmuls. The weights are read once for both, so the second
# utterance's tokens come almost free.
#
# What grows with the batch is the KV cache. Each utterance has its own, and the step's attention
# reads it. At one utterance the cache is a few megabytes next to a gigabyte of weights. At 64
# utterances it is gigabytes, and reading it dominates the step.
#
# Past a few rows (`fused_matvec.MAX_ROWS`) a matmul is no longer thin. There cuBLAS's tiled kernels beat our matvec
# kernels, so the decoder switches back to them.

# %% [markdown]
# ## The change
#
# ### Each utterance its own rows
#
# A batched decoder (`T3Decoder(streams=N)`) gives each utterance one CFG pair of rows. Its prefill
# writes each prompt into its own rows of the cache, and records its length, so each utterance
# decodes from its own position. All prompts share one forward pass, each padded at its end to the
# longest; a row's logits are read at its own last position.

# %%
show_code(lab.T3Decoder.prefill_streams)

# %% [markdown]
# ### Thin or not: who multiplies
#
# The matvec kernel serves a call only while its rows are few:

# %%
show_code(fused_matvec.kernel_applies)

# %% [markdown]
# The check: three utterances of different voices and texts, so of different prompt lengths,
# decode together. With sampling reduced to the most likely token (`top_p` tiny), nothing is
# random, so each must get the tokens it gets when decoded alone.

# %%
tts = lab.load_tts(preset="tiny", device="cpu")
voices = VoiceCache(tts)

# %%
# NBVAL_CHECK_OUTPUT
greedy = lab.SamplingParams(top_p=1e-6)
steps = ("static_cache", "embed_cache", "fused_projections")
conds = [voices.use(v).t3 for v in ("alto", "tenor", "alto")]
texts = [text_tokens_for(tts, t) for t in ("A first sentence.", "The second one is longer than the first.", "Third!")]
together = lab.T3Decoder(tts.t3, steps, streams=3).generate_batch(conds, texts, 24, greedy, stop_on_eos=False)
alone = lab.T3Decoder(tts.t3, steps)
same = [torch.equal(alone.generate(c, t, 24, greedy, stop_on_eos=False).tokens, got)
        for c, t, got in zip(conds, texts, together.all_tokens)]
print("each utterance gets its tokens from one decoded alone:", same)
assert all(same)

# %% [markdown]
# ## Proof
#
# ### One record, one process
#
# The plot reads the H100 record with the most batch sizes, decoded in one process with the
# record's last rung's steps. Left: the tokens per second of all utterances together, and of each.
# Right: the time per decode step.

# %%
path, doc = chapters.batch_record()
display(Markdown(f"`{chapters.record_name(path)}`, {doc['provenance']['gpu']}"))
report.plot_batch(doc);
display(Markdown(report.batch_table(doc)))

# %% [markdown]
# ### The gain of 64 utterances, with its spread
#
# Each ratio is the total rate of 64 utterances over one utterance's, in one process. The spread
# runs across every H100 record that measured both. The single-utterance rung got faster from record
# to record, while 64 utterances stayed near cuBLAS's rate, so the ratio shrank.

# %%
gain = chapters.batch_gain(64)
print(f"64 utterances over one: {gain.text(suffix='x')} the tokens per second, across {gain.records} records")
assert gain.low > 5

# %% [markdown]
# ### Where a large batch's step goes
#
# Attention over the whole allocation reads every utterance's cache in each step. At the record's
# copy bandwidth, that read alone takes this share of the step:

# %%
# NBVAL_CHECK_OUTPUT
reads = chapters.cache_read_ms(doc)
for n, (cache_ms, step_ms) in reads.items():
    print(f"a batch of {n:>2}: reading the KV cache takes {cache_ms / step_ms:.0%} of the step")
shares = [cache_ms / step_ms for cache_ms, step_ms in reads.values()]
assert shares == sorted(shares)

# %% [markdown]
# Past 64 utterances, one record decoded 64, 128 and 256 at once with attention over the filled
# cache blocks only. The step's time grows almost in proportion to the batch: the cache sets it.

# %%
wide_path, wide = [(p, d) for p, d in results.all_with("beyond", ("filled_cache_attention",), batch=True)
                   if "256" in d["batch"]["streams"]][-1]
display(Markdown(f"`{chapters.record_name(wide_path)}`\n\n" + report.batch_table(wide)))

# %% [markdown]
# No committed trace covers a batched step yet, so this chapter has no trace view. The single
# utterance's step is traced in [06b](06b_owning_the_graph.ipynb). The launch counts are those of
# the rung the batch decodes with: one graph replay per step, whatever the batch.
#
# ## Summary
#
# - A decode step reads the weights once for every utterance in the batch.
# - Each utterance keeps its own rows, prompt, position and stop, and gets its own tokens.
# - At large batches the KV cache, which grows with every utterance, sets the step's time.
#
# ## Exercises
#
# 1. Build decoders of the tiny model for 1 and 4 utterances with a cache of 64 slots. How does the
#    KV cache's size grow?

# %%
sizes = {n: lab.T3Decoder(tts.t3, ("static_cache", "embed_cache"), streams=n, max_cache_len=64).forward.cache.nbytes()
         for n in (1, 4)}
print({n: f"{size / 2**20:.2f} MiB" for n, size in sizes.items()})
assert sizes[4] == 4 * sizes[1]

# %% [markdown]
# 2. From the batch table above, how much slower is each utterance at 64 than alone? Compare that
#    with the gain in total tokens per second.

# %%
streams = doc["batch"]["streams"]
slowdown = streams["1"]["per_stream_tok_s"] / streams["64"]["per_stream_tok_s"]
print(f"each utterance {slowdown:.1f}x slower, all together "
      f"{streams['64']['aggregate_tok_s'] / streams['1']['aggregate_tok_s']:.1f}x faster")
assert slowdown < 64

# %% [markdown]
# 3. Decode the three utterances above with `streams=3` and `top_p` at its default. Are the tokens
#    still those of each utterance alone? Why not, when the random draws are shared by the batch?
