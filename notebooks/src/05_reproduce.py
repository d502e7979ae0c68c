# %% [markdown]
# # 05 · Reproduce the benchmark, next to the guide's
#
# `make bench` runs every rung of the ladder in one process on the current
# device (upstream fp32, bf16, static cache, embedding cache, compiled), plus a
# measurement of the card's memory bandwidth, and writes three files: the
# results JSON (with its provenance: card, driver, CUDA, torch, transformers,
# commit, command line, date, raw timings), a Markdown table and a PNG plot.
# On your own GPU:
#
# ```bash
# make bench                          # or: .venv/bin/python -m chatterbox_lab bench --ladder --checks
# ```
#
# This notebook needs no GPU: it reads the committed results in
# `data/results/` and the guide's published figures in `data/reference/`.

# %%
from IPython.display import Markdown, display

from chatterbox_lab.records import reference, report, results

doc = results.latest_gpu_result()
prov = doc["provenance"]
display(Markdown(f"**{prov['gpu']}**, driver {prov['driver']}, CUDA {prov['cuda']}, torch {prov['torch']}, "
                 f"commit `{prov['git_commit'][:10]}`, {prov['date_utc']}: `{prov['command']}`"))
display(Markdown(results.markdown_table(doc, ("t3_decode_tok_s", "t3_speedup_vs_upstream", "floor_tok_s",
                                               "fraction_of_floor", "e2e_s", "rtf", "peak_vram_mib",
                                               "compile_s", "gpu_kernels_per_token",
                                               "host_launches_per_token"))))

# %%
# NBVAL_CHECK_OUTPUT
print("card:", prov["gpu"], "| preset:", prov["preset"], "| tokens:", prov["tokens"])
print("rungs:", list(doc["rungs"]))

# %% [markdown]
# ## The roofline
#
# A decode step reads every T3 weight once (for both CFG rows) plus the filled
# part of the KV cache. That many bytes over the measured copy bandwidth is the
# fastest a step can possibly be; `fraction_of_floor` is each rung's decode
# rate over that limit. The floor for the fp32 baseline is half the bf16 one
# (twice the bytes).

# %%
fig = report.plot_rungs(doc)

# %%
compiled = doc["rungs"]["compiled"]
print(f"copy bandwidth {doc['roofline']['copy_bandwidth_gb_s']:,.0f} GB/s; a bf16 step reads "
      f"{compiled['bytes_per_step'] / 1e9:.2f} GB: floor {compiled['floor_ms_per_token']:.3f} ms/token "
      f"= {compiled['floor_tok_s']:,.0f} tok/s; compiled reaches {compiled['fraction_of_floor']:.0%} of it")

# %% [markdown]
# ## The guide's figures (RTX 4090), restated
#
# The guide's "tokens/s" is computed by its test script as audio seconds × 50
# over the whole generation time. Speech tokens are 25 per second of audio,
# and that time includes conditioning and S3Gen, so a published figure X means
# X / 50 times real time, end to end, and X / 2 speech tokens per second of
# wall time; it is not a T3 decode rate. The guide's own T3 decode rate is its
# "iterations/s (sampling)" row, the progress bar of the token loop.

# %%
guide = reference.guide()
rows = ["| guide figure | published tokens/s | × real time | speech tokens/s, end to end |", "|---|---|---|---|"]
published = [("4090 baseline", guide["rtx4090_results"][0]["baseline"]),
             ("4090 optimized", guide["rtx4090_results"][0]["optimized"])]
published += [(m["model"] + " (optimized)", m["tokens_per_s_as_published"]) for m in guide["model_comparison_optimized"]]
for name, value in published:
    r = reference.restate(value)
    rows.append(f"| {name} | {value} | {r['x_realtime']:.2f} | {r['speech_tok_s_end_to_end']:.1f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The guide also contradicts itself: its model comparison gives the *base*
# Chatterbox, optimized, 77.1 "tokens/s" at RTF 1.946 (slower than real time),
# while its headline 150.8 belongs to a fine-tuned checkpoint. RTF 1.946 and
# 77.1 × 2 / 50 = 3.1× real time cannot both describe the same runs.

# %% [markdown]
# ## Side by side, in the same units

# %%
rows = reference.side_by_side(doc)
display(Markdown(reference.markdown(rows)))

# %%
# NBVAL_CHECK_OUTPUT
t3 = rows[0]
print(f"T3 decode speed-up, compiled over upstream_fp32 on the {t3['card']}: {t3['ours_speedup']:.1f}x")
print(f"the guide's headline speed-up: {guide['headline_speedup']}x (end to end, RTX 4090)")
print(f"end-to-end speed-up here: {rows[1]['ours_speedup']:.1f}x")

# %% [markdown]
# ## Why the speed-ups differ
#
# - **Different quantities.** The guide's 3.75× is end to end (its "tokens/s"
#   includes conditioning and S3Gen, which the ladder does not touch); ours
#   for T3 is decode only. Compared end to end the gap narrows (the rows
#   above): once T3 is fast, S3Gen's flow takes most of what remains.
# - **Different baselines.** Upstream's loop is bound by the host: over a
#   thousand kernels launched one by one per token. How slow that is depends
#   on the CPU's single-thread speed more than on the GPU; a desktop CPU beside
#   a 4090 launches faster than a data-centre host beside an H100, so the
#   H100's baseline is relatively worse and the graph's gain larger.
# - **Different ceilings.** Once the step is one graph replay, the GPU sets
#   the pace. An H100 reads memory about three times as fast as a 4090 (HBM3
#   against GDDR6X), so the compiled step's ceiling is higher; the fraction of
#   the floor reached, not the token rate, is what compares across cards.
# - **A different compiled step.** Here the whole step, sampling arithmetic
#   included, is one graph, and no value goes back to the host per token; the
#   guide's step compiles the forward and samples outside it.
#
# What is left: the compiled step still reads memory far below the card's
# rate (its `fraction_of_floor`). Closing that gap (fused projections,
# attention over the filled part of the cache only, kernels that read these
# thin matrices faster than cuBLAS) is the next stage of the workbook.
