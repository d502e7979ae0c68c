# %% [markdown]
# # 06e · Appendix: what measured slower, and why
#
# ## What you will learn
#
# - Which ideas past the guide were built, tested and measured slower, and the record that shows
#   each.
# - Why fewer kernels per token is not always faster: what a *link* between kernels really costs.
# - Why these steps stay in the package, off the default path.
#
# **Prerequisites:** [06a](06a_fused_kernels.ipynb) to [06d](06d_many_utterances.ipynb). Words such as
# *link*, *wait* and *program* are in the [glossary](../docs/glossary.md).
#
# **Runtime:** about 10 s on a CPU. On a GPU the same: it reads committed H100 and H200 records.

# %%
from IPython.display import Markdown, display

import chatterbox_lab as lab
from chatterbox_lab.decode import t3_forward
from chatterbox_lab.kernels.experimental import head_handoff, persistent_layer
from chatterbox_lab.measure import profiling, step_trace
from chatterbox_lab.records import chapters, results
from chatterbox_lab.source import show_code

steps = chapters.chapter_steps("06e_measured_slower")
display(Markdown(chapters.steps_table("06e_measured_slower")))

# %% [markdown]
# ## Why
#
# Each chapter before this one cut kernels per token, and each cut made the step faster. The steps
# here cut kernels too, and each made the step slower. They teach what the other chapters left
# implicit.
#
# A kernel boundary is cheap when kernels are dependent launches: the next kernel is already
# resident and loading its weights. What costs time is each link's chain of round trips to memory
# after the wait. Replacing a boundary with counters in memory adds round trips; it does not remove
# them.
#
# These steps stay in the package because they run and are tested, and because a future card or
# compiler may change the verdict. The registry marks them `experimental` and names the record
# that measured each. No preset but `all` switches them on.

# %% [markdown]
# ## The change
#
# ### q/k/v handing each head over to attention (`head_handoff`)
#
# The q/k/v programs come first. Each bumps its head group's counter once its columns are stored.
# The attention programs poll their group's counter, then attend, without waiting for the whole
# q/k/v kernel.

# %%
show_code(head_handoff._handoff_kernel.fn)

# %% [markdown]
# ### A layer as one kernel with barriers (`persistent_layers`)
#
# One or two programs per SM stay resident for a whole layer. Between its five phases they meet at a
# grid-wide barrier: each program adds one to a counter, then polls it until all have arrived.

# %%
show_code(persistent_layer._grid_barrier.fn)

# %% [markdown]
# ### Attention over the filled blocks only (`filled_cache_attention`)
#
# Flex attention gets a block mask that lists only the cache blocks each row has filled. It is built
# on the device from the prompt lengths and the step counter, so one captured graph serves every
# step.

# %%
show_code(t3_forward.filled_cache_mask)

# %% [markdown]
# The check: no preset but `all` includes these steps, and a step that takes over from another
# leaves the plan one way. On a CPU the plan still resolves, and the tests run the kernels through
# Triton's interpreter.

# %%
# NBVAL_CHECK_OUTPUT
recommended = set(lab.preset("recommended", "hopper"))
everything = set(lab.preset("all", "hopper"))
print("in the recommended preset:", sorted(recommended & set(steps)))
print("in the preset `all`:", sorted(everything & set(steps)))
both = lab.registry.requirements("persistent_layers") | {"persistent_layers", "head_handoff"}
print("head_handoff and persistent_layers together run layers as:", lab.DecodePlan.resolve(both, "cpu").layer)
assert not recommended & set(steps) and set(steps) <= everything

# %% [markdown]
# ## Proof
#
# ### One record, one process
#
# The plot reads one record, next to the recommended rung that process measured before it. No
# committed record yet holds every experimental rung, so it shows the newest holding the most.

# %%
slower = chapters.slower_steps()
chapters.plot_chapter(steps, context=("compiled", "recommended", *(s.baseline for s in slower)));

# %% [markdown]
# ### Each step against the rung before it
#
# The table reads the record each step's registry entry names. Every ratio is within one process.

# %%
display(Markdown(chapters.slower_table(slower)))
handoff = chapters.speedup("head_handoff", "fused_bookkeeping")
persistent = chapters.speedup("persistent_layers", "dependent_launch", gpu=None)
print(f"head_handoff over fused_bookkeeping: {handoff.text(suffix='x')} across {handoff.records} H100 records")
print(f"persistent_layers over dependent_launch: {persistent.text(suffix='x')} across {persistent.records} "
      "records of any card")
assert handoff.high < 1 and persistent.high < 1

# %% [markdown]
# Both cut kernels per token, `persistent_layers` most of them, and both slowed the step. Each
# q/k/v program now publishes its columns with a release and an atomic. Each attention program
# learns of it through polls of L2. A kernel boundary did that publishing once for the whole grid,
# in hardware. A barrier between phases still pays a chain of round trips: arrive, see that all
# have arrived, read the previous phase's output.

# %%
traces = {rung: profiling.load_trace(f"../data/traces/h100/{rung}.pt.trace.json.gz")
          for rung in ("fused_bookkeeping", "head_handoff", "dependent_launch", "persistent_layers")}
step_trace.plot_steps(traces, steps=2, title="two decode steps per rung, H100 traces of several processes");

# %% [markdown]
# ### Weights prefetched into L2 (`l2_prefetch`, taken out)
#
# Each matvec kernel once asked a later kernel's weights into L2 as it started. It was slower, and
# slower the further ahead it prefetched: the prefetches compete for memory bandwidth with the
# loads the chain waits for. The step was taken out; its record remains.

# %%
prefetch_path, prefetch = results.latest_with("beyond", ("fused_bookkeeping", "l2_prefetch"))
ahead = prefetch["chain_sweep"]["calls"]["prefetch_ahead"]["tried"]
print(f"`{chapters.record_name(prefetch_path)}`: l2_prefetch "
      f"{prefetch['rungs']['l2_prefetch']['t3_decode_tok_s']:,.0f} tok/s against fused_bookkeeping "
      f"{prefetch['rungs']['fused_bookkeeping']['t3_decode_tok_s']:,.0f}")
print("tok/s by how many kernels ahead it prefetched:", {k: round(v) for k, v in ahead.items()})

# %% [markdown]
# ### Attention over the filled blocks, at one utterance and at 64
#
# For one utterance the filled-block attention is slower. Flex decoding splits the cache across the
# SMs and reduces the parts in a second kernel, and the block mask is rebuilt every step. That is
# more kernels per token than one cuDNN kernel over a cache that is small anyway. For 64 utterances,
# whose caches are most of what a step reads, the same record measured it faster than a record of
# the whole allocation:

# %%
filled = next(s for s in slower if s.step == "filled_cache_attention")
record = results.load(results.RESULTS_DIR / filled.record)
whole_path, whole = results.latest_with("beyond", ("sampling_in_graph",), batch=True)
print(f"one utterance: {filled.rate:,.0f} tok/s against {filled.baseline_rate:,.0f} ({filled.record})")
print(f"64 utterances: {record['batch']['streams']['64']['aggregate_tok_s']:,.0f} tok/s with it, "
      f"{whole['batch']['streams']['64']['aggregate_tok_s']:,.0f} over the whole allocation "
      f"({chapters.record_name(whole_path)}, another process)")

# %% [markdown]
# ## Summary
#
# - Fewer kernels per token is not the goal; a shorter chain of round trips after each wait is.
# - Counters and grid barriers in memory publish what a kernel boundary published for free.
# - Slower steps stay runnable, tested and labelled, each with the record that measured it.
#
# ## Exercises
#
# 1. Check that every experimental step with evidence names a committed record that measured it.

# %%
for name in steps:
    evidence = lab.registry.STEPS[name].evidence
    assert name in results.load(results.RESULTS_DIR / evidence)["rungs"], (name, evidence)
print("every record named holds its step")

# %% [markdown]
# 2. Count the `_layer_kernel` launches in one step of the `persistent_layers` trace. How many layers
#    does T3 have?

# %%
trace = traces["persistent_layers"]
starts = step_trace.step_boundaries(trace)
layer_kernels = sum(1 for name, start, _ in profiling.kernel_spans(trace)
                    if name == "_layer_kernel" and starts[1] <= start < starts[2])
print("layer kernels in one step:", layer_kernels)
assert layer_kernels == 30

# %% [markdown]
# 3. Read `persistent_layer.programs_for` and `_check_resident`. Why must every program of a grid with
#    barriers be resident at once, and what does the kernel do with a grid that is not?
