# %% [markdown]
# # 06b · Owning the graph: capture, overlap and replay the step ourselves
#
# ## What you will learn
#
# - Why a step made of hand-written kernels is better captured as a CUDA graph directly than
#   through torch.compile.
# - How *dependent launches* let each kernel load its weights while the one before it finishes.
# - Why one graph per stop check, and one per prefill length, beat one graph per step.
#
# **Prerequisites:** notebook 04 (compile and CUDA graphs) and
# [06a](06a_fused_kernels.ipynb) (the kernels this graph holds). Words such as *link*, *wait* and
# *dependent launch* are in the [glossary](../docs/glossary.md).
#
# **Runtime:** about 40 s on a CPU (tiny model, fp32). On a GPU the same: the measurements come
# from committed H100 and H200 records.

# %%
from IPython.display import Markdown, display

import chatterbox_lab as lab
from chatterbox_lab.decode.compiled_step import CapturedStep
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.prefill_graph import BucketedPrefill
from chatterbox_lab.kernels import fused_matvec
from chatterbox_lab.measure import equivalence, profiling, step_trace
from chatterbox_lab.records import chapters, results
from chatterbox_lab.source import show_code

steps = chapters.chapter_steps("06b_owning_the_graph")
display(Markdown(chapters.steps_table("06b_owning_the_graph")))

# %% [markdown]
# ## Why
#
# After [06a](06a_fused_kernels.ipynb), every kernel of the step is ours. Inductor has little left
# to fuse, yet compiling the step with it still takes tens of seconds from empty caches. Capturing
# the step as a CUDA graph directly costs only the compile of our few Triton kernels.
#
# Inside the graph, each kernel still waits for the whole kernel before it to finish. A matmul's
# weights depend on no earlier kernel; only its input does. On Hopper a kernel can start as a
# *programmatic dependent* of the one before. It loads its weights at once and waits only where
# it reads what earlier kernels wrote. The time from one kernel's end to the next one's end is
# its *link*, and the step is the chain of its links.
#
# Between steps the host still had work: two small fills per replay for the random generator, and a
# launch. Replaying the steps between two stop checks as one graph pays that once per 16 steps.
# The prefill, the prompt's one large forward pass, was still eager; a graph per length bucket
# replays it too.

# %% [markdown]
# ## The change
#
# ### A step captured by hand
#
# `CapturedStep` runs the step once eagerly, so that Triton compiles its kernels, then captures it
# and replays the graph. With `runs`, it captures the steps between two stop checks as one graph.

# %%
show_code(CapturedStep.run, CapturedStep._capture)

# %% [markdown]
# ### Launching the next kernel early
#
# Every matvec kernel opens like this. Under `launch_ahead` it lets its dependent launch at its
# first instruction. Under `dependent_launch` it waits first (`gdc_wait`, inside the columns'
# code shown in [06a](06a_fused_kernels.ipynb)), then lets the next one launch.

# %%
show_code(fused_matvec._matvec_kernel.fn)

# %% [markdown]
# ### The prefill from a graph per length bucket
#
# A prompt's length varies, so its graph cannot be one shape. Prompts are padded up to a bucket,
# and each bucket's graph is captured on first use.

# %%
show_code(BucketedPrefill)

# %% [markdown]
# ### One plan, resolved once
#
# Which graph and which launch mode a decoder uses is a field of its `DecodePlan`. The plan is
# resolved once from the steps, and the decoder reads its fields, never step names. Below, each
# step with the steps it needs. On a CPU the launch mode stays plain: dependent launches need a
# Hopper GPU.

# %%
# NBVAL_CHECK_OUTPUT
for name in ("sampling_in_graph", "captured_graph", "launch_ahead", "multi_step_graph"):
    plan = lab.DecodePlan.resolve(lab.registry.requirements(name) | {name}, "cpu")
    print(f"{name:>17}: graph {plan.graph}, sampling {plan.sampling}, launch on a CPU {plan.launch}")
assert lab.DecodePlan.resolve(lab.preset("recommended", "hopper"), "cpu").graph == "multi_step"

# %% [markdown]
# On a CPU the captured step runs eagerly and every kernel takes its PyTorch path. So the
# recommended steps give upstream's tokens there in fp32, for the same seed.

# %%
tts = lab.load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(lab.voice_path("alto")))
text_tokens = text_tokens_for(tts, "The graph is ours now.")

# %%
# NBVAL_CHECK_OUTPUT
recommended = lab.preset("recommended", "cuda")
verdicts = equivalence.token_identity(tts, text_tokens, [recommended], n=24, seed=3)
print("the recommended steps of a CUDA GPU, run on a CPU:",
      "identical" if all(verdicts.values()) else "DIFFERENT", "to upstream")
assert all(verdicts.values())

# %% [markdown]
# ## Proof
#
# ### One record, one process
#
# The plot reads one record of an H100, every rung timed in one process. No committed record yet
# holds every step of this chapter, so it shows the record holding the most of them.

# %%
_, doc = chapters.chapter_record(steps)
chapters.plot_chapter(steps);

# %% [markdown]
# ### What each graph step gains, with its spread
#
# Each gain is a ratio within one process, over the rung before it, across every committed H100
# record that measured both. The lowest `sampling_in_graph` ratio is a first run whose graph
# copied the weights on every replay, because the fused weights were not marked static.

# %%
display(Markdown(chapters.gains_table(steps)))
print(chapters.gain_line("launch_ahead"))
assert chapters.step_gain("launch_ahead").low > 1

# %% [markdown]
# ### Start-up from empty caches
#
# The start-up of a rung, timed in a fresh process with empty Inductor and Triton caches. Each is one
# record, so read the table for its order of magnitude: `fused_sampling` still compiles under
# Inductor, `captured_graph` does not.

# %%
cold = results.cold_starts()
display(Markdown("| card | rung | cold start-up (s) | record |\n|---|---|---|---|\n" + "\n".join(
    f"| {gpu} | `{rung}` | {record['rungs'][rung]['compile_s']:.1f} | `{chapters.record_name(where)}` |"
    for (gpu, rung), (where, record) in sorted(cold.items()))))

# %% [markdown]
# The prefill from a graph, against the eager prefill, in one H200 process (seconds, lower is
# better):

# %%
prefill = chapters.speedup("prefill_graph", "dependent_launch", figure="t3_prefill_s", gpu=None)
print(f"prefill time from a graph over the eager prefill's: {prefill.text(suffix='x')} ({prefill.records} record)")

# %% [markdown]
# ### Launches per token, and the steps in a trace
#
# A graph per 16 steps launches once per 16 tokens, plus a stop check's copy every 16.

# %%
# NBVAL_CHECK_OUTPUT
launches = {rung: doc["rungs"][rung]["host_launches_per_token"] for rung in doc["rungs"]
            if rung in ("compiled", "staged_weights", "multi_step_graph")}
print("host launches per token:", {rung: round(n, 2) for rung, n in launches.items()})
assert launches["multi_step_graph"] < 1 <= launches["staged_weights"]

# %% [markdown]
# Three committed H100 traces, two decode steps each, on one time axis. Black lines are *step
# boundaries*. The profiler stretches every kernel, so compare rows only with each other.

# %%
traces = {rung: profiling.load_trace(f"../data/traces/h100/{rung}.pt.trace.json.gz")
          for rung in ("dependent_launch", "launch_ahead", "folded_prologue")}
step_trace.plot_steps(traces, steps=2, title="two decode steps per rung, H100, under the profiler");
lengths = {rung: min(step_trace.step_lengths_us(trace)) for rung, trace in traces.items()}
print("shortest step under the profiler (us):", {rung: round(us) for rung, us in lengths.items()})

# %% [markdown]
# ## Summary
#
# - Once every kernel is hand-written, capturing the step directly starts in seconds, not a minute.
# - Dependent launches overlap each kernel's weight loads with the kernel before it.
# - One graph per stop check and one per prefill bucket take the host off the critical path.
#
# ## Exercises
#
# 1. Count the graph launches inside the decode steps of the `staged_weights` and
#    `multi_step_graph` traces. Which one launches once per step?

# %%
def graph_launches(rung):
    trace = profiling.load_trace(f"../data/traces/h100/{rung}.pt.trace.json.gz")
    lo, hi = profiling.steps_window(trace)
    return sum(1 for e in trace["traceEvents"] if e.get("name") in profiling.GRAPH_LAUNCHES and lo <= e["ts"] < hi)


counted = {rung: graph_launches(rung) for rung in ("staged_weights", "multi_step_graph")}
print(counted)
assert counted["multi_step_graph"] < counted["staged_weights"]

# %% [markdown]
# 2. Build a `T3Decoder` of the tiny model with the recommended steps and read `decoder.plan`. Which
#    field would change on an H100, and why?

# %%
decoder = T3Decoder(tts.t3, lab.preset("recommended", "hopper"))
print(decoder.plan.graph, decoder.plan.launch, decoder.plan.prefill)
assert decoder.plan.launch == "plain"

# %% [markdown]
# 3. Open `../data/traces/h100/folded_prologue.pt.trace.json.gz` in [Perfetto](https://ui.perfetto.dev).
#    Find where one step's `_sample_kernel` ends and the next step's first kernel begins.
