# %% [markdown]
# # 06a · Fused kernels: one kernel where the step had many
#
# ## What you will learn
#
# - Why a decode step past the guide is bound by the number of kernels, not by arithmetic.
# - How one Triton kernel per matmul folds in the norm before it and the gate or residual after it.
# - How attention and sampling each became one kernel per layer or per utterance.
#
# **Prerequisites:** notebooks 00 to 05, the guide's four steps. Words such as *rung*, *floor*,
# *program* and *stretch* are defined in the [glossary](../docs/glossary.md).
#
# **Runtime:** about 30 s on a CPU (tiny model, fp32). On a GPU it is the same: the measurements
# come from committed H100 and H200 records, not from this machine.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import chatterbox_lab as lab
from chatterbox_lab.kernels import decode_attention, fused_matvec, fused_sampling
from chatterbox_lab.measure import equivalence, profiling, step_trace
from chatterbox_lab.records import chapters
from chatterbox_lab.source import show_code

steps = chapters.chapter_steps("06a_fused_kernels")
display(Markdown(chapters.steps_table("06a_fused_kernels")))

# %% [markdown]
# ## Why
#
# After the guide's `compiled` rung, each token runs hundreds of kernels in one CUDA graph. The host
# no longer sets the pace, so the GPU does. Yet the step reads T3's half a billion bf16 weights,
# about 1 GB, once per token. At the card's copy bandwidth that takes a fraction of the step.
#
# The gap is fixed cost per kernel. A kernel launches, loads its first bytes and drains its last
# programs, whatever the size of its work. At two rows per matmul (the CFG pair), that fixed cost
# is most of the time. Small kernels around each matmul add to it: a norm before, an activation or
# a residual add after, rotary embedding, the cache write.
#
# So the steps of this chapter cut the number of kernels per token:
#
# - `fused_projections` joins q, k and v into one matmul, and gate and up into another;
# - `fused_matvec` writes each matmul as a Triton kernel with its norm, gate or residual folded in;
# - `fused_attention` does rotary, the cache write and attention in one kernel per layer;
# - `fused_sampling` does the CFG mix, penalties, top-p and the draw in one kernel per utterance;
# - `fused_bookkeeping` moves the step's small PyTorch operations into a prologue and the sampler.

# %% [markdown]
# ## The change
#
# ### A matmul with its neighbours folded in
#
# `reference_matvec` is what the kernel computes, in PyTorch. It is upstream's RMSNorm, matmul, SiLU
# gate and residual, operation for operation. Upstream's two modules are beside it.

# %%
show_code(fused_matvec.rms_normed, fused_matvec.reference_matvec,
          beside=["transformers.models.llama.modeling_llama:LlamaRMSNorm.forward",
                  "transformers.models.llama.modeling_llama:LlamaMLP.forward"])

# %% [markdown]
# The check: a gate/up call and a down call of the reference give upstream's MLP block bit for bit.

# %%
# NBVAL_CHECK_OUTPUT
from types import SimpleNamespace

from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

torch.manual_seed(0)
norm = LlamaRMSNorm(64, eps=1e-5)
mlp = LlamaMLP(SimpleNamespace(hidden_size=64, intermediate_size=96, hidden_act="silu", mlp_bias=False))
x = torch.randn(2, 1, 64)
gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
act = fused_matvec.reference_matvec(x, gate_up, norm=fused_matvec.Norm.of(norm), gated=True)
out = fused_matvec.reference_matvec(act, mlp.down_proj.weight, residual=x)
print("norm, gate/up, SiLU gate, down and residual in two calls equal upstream's block:",
      torch.equal(out, x + mlp(norm(x))))
assert torch.equal(out, x + mlp(norm(x)))

# %% [markdown]
# The kernel itself gives each *program* a few output columns. It loads their whole weight rows
# before its wait for the kernel before it, then reads the input once. Thousands of loads are in
# flight across the card at once. On a CPU, tests run it through Triton's interpreter.

# %%
show_code(fused_matvec.matvec_columns.fn)

# %% [markdown]
# ### Attention over the filled slots, split across the card
#
# Upstream's attention gives each (row, head) pair one program: 32 programs for a CFG pair, a
# quarter of an H100. Our kernel splits each pair's filled cache slots into *stretches*, one program
# each, and the last program to finish combines their partial softmaxes. The position is device
# data, so one captured graph serves every step.

# %%
show_code(decode_attention.splits_for, decode_attention._stretch.fn)

# %% [markdown]
# ### Top-p without sorting the vocabulary
#
# Compiled, PyTorch's sampling is a dozen kernels and a radix sort for top-p. The tokens top-p drops
# are exactly those at or below some probability cut. Probabilities are non-negative floats, so their
# bit patterns sort like their values: 31 halvings of the bit pattern find the cut without a sort.

# %%
show_code(fused_sampling._top_p_kept.fn)

# %% [markdown]
# The kernels sum in their own order, so they are not bit for bit upstream. They are checked by
# teacher-forced logits and by tokens for the same random draws (CPU tests through the interpreter,
# GPU tests on the card). `fused_projections` keeps PyTorch's arithmetic: in fp32 it gives
# upstream's tokens for the same seed.

# %%
# NBVAL_CHECK_OUTPUT
from chatterbox_lab.decode.decoder import text_tokens_for

tts = lab.load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(lab.voice_path("alto")))
text_tokens = text_tokens_for(tts, "Fewer kernels per token.")
verdicts = equivalence.token_identity(tts, text_tokens, [("static_cache", "embed_cache", "fused_projections")],
                                      n=24, seed=3)
for step_set, same in verdicts.items():
    print(f"{step_set}: {'identical' if same else 'DIFFERENT'} to upstream")
assert all(verdicts.values())

# %% [markdown]
# ## Proof
#
# ### One record, one process
#
# The plot reads one record: its rungs ran one after another in one process on one card. No
# committed H100 record yet holds every step of this chapter, so the plot shows the record that
# holds the most of them. Each bar is a rung's decode rate; the black mark is its *floor*, the rate
# at which the card could just read that rung's weights and cache once per token.

# %%
_, doc = chapters.chapter_record(steps)
chapters.plot_chapter(steps);

# %% [markdown]
# ### What each fused kernel gains, with its spread
#
# Each gain below is a ratio within one process: the step's rung over the rung before it. The
# columns give the median and the spread across every committed record, of any card, that measured
# both. A step measured once says so in the last column.

# %%
display(Markdown(chapters.gains_table(steps, gpu=None)))
print(chapters.gain_line("fused_bookkeeping"))
assert chapters.step_gain("fused_bookkeeping").low > 1

# %% [markdown]
# ### Kernels per token, and the steps in a trace
#
# Kernel counts do not vary between runs. Each step of this chapter cuts them.

# %%
# NBVAL_CHECK_OUTPUT
order = ["compiled", *[name for name in steps if name in doc["rungs"]]]
counts = {name: round(doc["rungs"][name]["gpu_kernels_per_token"]) for name in order}
print(f"kernels per token ({doc['provenance']['gpu']}):", counts)
assert list(counts.values()) == sorted(counts.values(), reverse=True)

# %% [markdown]
# Three committed traces of one H200 show two decode steps each, on one time axis. The black lines
# are *step boundaries*. A trace runs slower than the timed step, because the profiler stretches
# every kernel of a replayed graph, so compare the rows with each other only. Open the same files in
# [Perfetto](https://ui.perfetto.dev) to see each kernel by name.

# %%
traces = {rung: profiling.load_trace(f"../data/traces/h200/{rung}.pt.trace.json.gz")
          for rung in ("fused_matvec", "fused_attention", "fused_sampling")}
step_trace.plot_steps(traces, steps=2, title="two decode steps per rung, one H200, under the profiler");
lengths = {rung: min(step_trace.step_lengths_us(trace)) for rung, trace in traces.items()}
print("shortest step under the profiler (us):", {rung: round(us) for rung, us in lengths.items()})

# %% [markdown]
# ## Summary
#
# - Past the guide, a decode step pays a fixed cost per kernel; fewer kernels per token is the gain.
# - Each matmul is one Triton kernel with its norm, gate or residual inside, checked against upstream.
# - Attention is one kernel per layer split over the cache, and sampling one kernel with no sort.
#
# ## Exercises
#
# 1. The full model's gate/up call has 4,096 output columns and 1,024 inputs. How many programs
#    does the default configuration launch? Check your answer against the cell.

# %%
config = fused_matvec.default_config(4096, 1024, gated=True)
programs = -(-4096 // config.block_n)
print(f"gate/up: {config}, {programs} programs")
assert programs == 512

# %% [markdown]
# 2. The record of `fused_matvec` holds a sweep of every matmul of the step (`matvec_sweep`). Compute
#    each call's bandwidth from its weight bytes and best time. Is any call at the card's copy
#    bandwidth?

# %%
_, sweep_doc = chapters.chapter_record(["fused_matvec"])
copy_gb_s = sweep_doc["roofline"]["copy_bandwidth_gb_s"]
achieved = {name: call["weight_mib"] * 2**20 / call["best_us"] / 1e3 for name, call in sweep_doc["matvec_sweep"].items()}
print({name: f"{gb_s:,.0f} GB/s" for name, gb_s in achieved.items()}, f"copy bandwidth {copy_gb_s:,.0f} GB/s")
assert all(gb_s < copy_gb_s for gb_s in achieved.values())

# %% [markdown]
# 3. Run the reference in bfloat16: cast `norm`, `mlp` and `x` with `.to(torch.bfloat16)` and repeat
#    the first check. Is it still bit for bit?
