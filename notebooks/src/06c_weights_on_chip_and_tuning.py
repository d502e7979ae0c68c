# %% [markdown]
# # 06c · Weights staged on chip, and kernels tuned on the card
#
# ## What you will learn
#
# - Why a kernel that loads its weights before its wait needs somewhere to keep them, and why
#   shared memory beats registers for that.
# - How the kernels' configurations are tuned inside the whole step, on the card, and why that
#   search is noisy.
# - How tuned configurations travel as data: `KernelPicks`, the picks shipped per card model, and
#   `--tune`.
#
# **Prerequisites:** [06a](06a_fused_kernels.ipynb) (the kernels) and
# [06b](06b_owning_the_graph.ipynb) (dependent launches). Words such as *program*, *link* and
# *wait* are in the [glossary](../docs/glossary.md).
#
# **Runtime:** about 15 s on a CPU. On a GPU the same: the measurements come from committed H100
# records.

# %%
from IPython.display import Markdown, display

import chatterbox_lab as lab
from chatterbox_lab.kernels import staged_matvec
from chatterbox_lab.measure import profiling, step_trace
from chatterbox_lab.records import chapters, results
from chatterbox_lab.tuning import chain_tuning
from chatterbox_lab.source import show_code

steps = chapters.chapter_steps("06c_weights_on_chip_and_tuning")
display(Markdown(chapters.steps_table("06c_weights_on_chip_and_tuning")))

# %% [markdown]
# ## Why
#
# Under `launch_ahead` a kernel launches while the kernels before it still run. It loads its
# weights, then waits for its input. A Triton kernel can keep those early weights only in
# registers, and every resident kernel shares an SM's registers. Four gate/up programs fill most of
# them, so gate/up's last programs start only as earlier kernels leave. Much of its 16.8 MB then
# streams after its wait, on the step's critical path.
#
# Shared memory is the other place on chip. Copies into it are asynchronous and need no registers
# while they fly. `staged_weights` copies gate/up's weight rows there before the wait, and
# `staged_head` does the same for the speech head.
#
# Each kernel also has knobs: columns per program, warps, stretches of the cache. The best values
# depend on the card and on the kernels around them. Timing one kernel alone picks differently from
# timing the whole step, so the tuning runs inside the captured step, on the card.

# %% [markdown]
# ## The change
#
# ### How much shared memory to ask for
#
# The staged kernel is written in Gluon, Triton's lower-level language, which places data in shared
# memory by hand. One more detail made it pay. Triton asks for the largest shared-memory share of
# an SM's L1 for any kernel above 48 KiB. That starved the other kernels of L1. The staged kernel
# asks only for what its programs need:

# %%
show_code(staged_matvec.carveout_percent, staged_matvec._carve)

# %% [markdown]
# ### Tuning inside the step
#
# The chain tuning is a coordinate descent. Each knob in turn tries every candidate with the others
# fixed, recaptures the step and times whole decodes. The closest candidates are then timed again
# in alternating rounds, since one measurement moves by a percent or two.

# %%
show_code(chain_tuning.descend)

# %% [markdown]
# ### Picks: tuned configurations as data
#
# What the tuning found is a `KernelPicks`: an immutable value a decoder takes when it is built.
# Every record saves the picks it ran with. The picks of a committed record ship with the package,
# one file per card model, so a fresh process starts at the tuned rate without tuning.

# %%
show_code(lab.KernelPicks.with_pick, lab.shipped_for)

# %% [markdown]
# The check: the latest H100 ladder record ran with exactly the picks the package ships for that
# card. A card without shipped picks runs the kernels' defaults.

# %%
# NBVAL_CHECK_OUTPUT
h100 = "NVIDIA H100 80GB HBM3"
ladder_path, ladder = results.latest_with("", ("recommended",))
shipped = lab.shipped_for(h100)
print("the ladder record ran with the shipped H100 picks:", ladder["picks"]["calls"] == shipped.names())
print("a card without shipped picks runs the defaults:", lab.shipped_for("A card not measured").names() == {})
assert ladder["picks"]["calls"] == shipped.names() and not lab.shipped_for("A card not measured").names()

# %% [markdown]
# ## Proof
#
# ### One record, one process
#
# The plot reads one H100 record, its rungs timed in one process with the chain tuning's picks.

# %%
chapters.plot_chapter(steps);

# %% [markdown]
# ### What staging gains, with its spread
#
# Staging gate/up is the larger gain. Staging the head as well measured level, within the noise.

# %%
display(Markdown(chapters.gains_table(steps)))
print(chapters.gain_line("staged_weights"))
assert chapters.step_gain("staged_weights").low > 1

# %% [markdown]
# ### What the tuning buys, and how much it varies
#
# Every record made with the tuning ends with an A/B in one process: its starting picks against
# its tuned picks, in alternating rounds.

# %%
tuned = chapters.tuning_gain()
print(f"tuned picks over the starting picks: {tuned.text(suffix='x')} across {tuned.records} records")
assert tuned.low >= 1

# %% [markdown]
# The picks the tuning lands on vary from process to process, since many candidates time alike. A
# descent that starts from a good record's picks (`bench --tune-from RECORD`) keeps them unless a
# contender measures faster. The rates of `folded_prologue` across every H100 record show the
# spread that is left:

# %%
rates = chapters.spread.of(d["rungs"]["folded_prologue"]["t3_decode_tok_s"]
                           for _, d in results.all_with("beyond", ("folded_prologue",)))
print(f"folded_prologue: {rates.text(digits=4, suffix=' tok/s')} across {rates.records} records")

# %% [markdown]
# ### Launch counts and links in a trace
#
# Staging changes no kernel count: the same kernels read their weights from another place. The
# trace shows where the time went. Each row below is one kernel of a layer (medians over the
# traced layers). A kernel *starts* when its first programs are resident; its *link* is how long
# after the kernel before it it ends.

# %%
links = {rung: profiling.layer_links(profiling.load_trace(f"../data/traces/h100/{rung}.pt.trace.json.gz"))
         for rung in ("fused_bookkeeping", "staged_weights")}
display(Markdown("| rung | kernel | programs | registers per thread | shared memory (KiB) | link (us) |\n"
                 "|---|---|---|---|---|---|\n" + "\n".join(
                     f"| `{rung}` | `{profiling.short_name(row['kernel'])}` | {row['programs']} | {row['registers']} | "
                     f"{row['shared_bytes'] / 1024:.0f} | {row['link_us']:.1f} |"
                     for rung, rows in links.items() for row in rows)))
layer_us = {rung: sum(row["link_us"] for row in rows) for rung, rows in links.items()}
print("one layer, the sum of its links (us, under the profiler):", {r: round(us, 1) for r, us in layer_us.items()})

# %%
traces = {rung: profiling.load_trace(f"../data/traces/h100/{rung}.pt.trace.json.gz")
          for rung in ("fused_bookkeeping", "staged_weights", "staged_head")}
step_trace.plot_steps(traces, steps=2, title="two decode steps per rung, H100, under the profiler");

# %% [markdown]
# ## Summary
#
# - Weights loaded before a kernel's wait need a place on chip; shared memory holds them without
#   taking registers from the kernels around.
# - Kernel configurations are tuned inside the captured step, and the search is only as good as the
#   noise of one decode allows.
# - Tuned picks are data: saved in every record, shipped per card model, passed to the decoder.
#
# ## Exercises
#
# 1. Change one pick with `with_pick` and check that the shipped picks did not change.

# %%
from chatterbox_lab.kernels.picks import config_named

other = shipped.with_pick("gate_up", config_named("staged_n16_c256_l4_wn4_w4"))
print(other.names()["gate_up"], "against", shipped.names()["gate_up"])
assert other.names() != shipped.names() and lab.shipped_for(h100).names() == shipped.names()

# %% [markdown]
# 2. Run the descent on a made-up step: one knob whose rate peaks at 8, with a little noise. Does it
#    find the peak? Try more noise and fewer `rounds`.

# %%
import random

random.seed(0)
setting = {}
found = chain_tuning.descend({"columns": (2, (1, 2, 4, 8, 16))}, apply=setting.__setitem__,
                             rate=lambda: 1000 - (setting["columns"] - 8) ** 2 + random.gauss(0, 1))
print("best:", found["columns"]["best"])
assert found["columns"]["best"] == 8

# %% [markdown]
# 3. The bench tunes on the card with `--tune`, and starts from a record's picks with
#    `--tune-from RECORD`. Read `python -m chatterbox_lab bench --help`: what does `--tune-from`
#    do without `--tune`, and when would you want that?
