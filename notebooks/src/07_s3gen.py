# %% [markdown]
# # 07 · S3Gen: the waveform side
#
# Once T3 runs from one CUDA graph, a request's time moves to S3Gen.
# This notebook makes that side fast without changing what it computes.
# Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - Where an utterance's time goes once T3 is fast.
# - How one CUDA graph serves every length in a bucket, with padding that changes nothing.
# - Why float16 suits the flow's estimator better than bfloat16, and what compiling its blocks saves.
#
# **Prerequisites:** [04 · compile](04_compile.ipynb).
#
# **Runtime:** about a minute on a CPU (the `tiny` preset); GPU figures come from committed records.

# %%
import numpy as np
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import show_code
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
from chatterbox_lab.records import report, results, spread
from chatterbox_lab.registry import S3GEN_STEPS
from chatterbox_lab.s3gen.s3gen_steps import (FRAME_BUCKET, HALF_FLOW_TOLERANCE, BucketedEstimator, apply_s3gen_steps,
                                              half_flow_error)

# %% [markdown]
# ## Why
#
# S3Gen runs in three parts.
# Its flow is a conformer encoder, then ten Euler steps of a CFM estimator, a U-Net run on the CFG pair.
# HiFi-GAN turns the mels into a waveform, and the Perth watermark marks it.
# Eagerly, the flow waits for Python to launch its kernels, as T3's loop did.
#
# The S3Gen steps, in the ladder's order:
#
# 1. `flow_graphs`: the estimator replayed from CUDA graphs, one per length bucket.
# 2. `flow_half`: the estimator in float16, its difference from fp32 measured.
# 3. `watermark_on_device`: Perth's network on the GPU.
# 4. `encoder_graphs`: the flow's encoder from graphs too, per token bucket.
# 5. `voice_encoders_on_host`: S3Gen's tokenizer and speaker encoder kept in host memory, on the GPU only while a voice is prepared.
# 6. `hifigan_compiled`: HiFi-GAN's convolution stack under `torch.compile`.
# 7. `flow_fused_projections`: the estimator's q, k and v as one matmul.
# 8. `flow_compiled`: the estimator's blocks under `torch.compile`, inside the graphs.
#
# A CUDA graph replays fixed shapes, but every utterance has its own length.
# So the estimator's frames are padded to the next multiple of `FRAME_BUCKET` with masked frames.
# One graph then serves every length in its bucket.
# The model computes the same thing: its convolutions are causal, its attention masks padded keys, and every block multiplies by the mask.

# %% [markdown]
# ## The change
#
# `apply_s3gen_steps` switches steps on in place; `BucketedEstimator` pads each call to its bucket and replays that bucket's graph.

# %%
show_code(apply_s3gen_steps, BucketedEstimator)

# %% [markdown]
# ## Proof
#
# ### Where the time goes
#
# One 10-second utterance (256 tokens) per rung, from the latest record, made in one process.
# The first bar is T3 with every step past the guide; the rest add S3Gen's steps one by one.

# %%
path, doc = results.latest_with("e2e", ("upstream_fp32", S3GEN_STEPS[0]))
card = doc["provenance"]["gpu"]
fast = {name: r for name, r in doc["rungs"].items() if name != "upstream_fp32"}
report.plot_stages({name: r["stages_s"] for name, r in fast.items()},
                   title=f"{card}, {doc['provenance']['tokens']} tokens, seconds per stage ({path.name})");

# %% [markdown]
# The flow's three first forms across every record of this card: eager fp32, replayed from graphs, then float16.

# %%
def eager_rung(rungs):
    """The record's last T3 rung: its S3Gen is upstream's, eager."""
    return [name for name in rungs if name not in ("upstream_fp32", *S3GEN_STEPS)][-1]


records = [d["rungs"] for _, d in results.all_with("e2e", ("upstream_fp32", "flow_half")) if d["provenance"]["gpu"] == card]
flow = {form: spread.of(r[rung(r)]["stages_s"]["s3gen_flow"] for r in records)
        for form, rung in (("eager fp32", eager_rung), ("graphs", lambda r: "flow_graphs"), ("float16", lambda r: "flow_half"))}
display(Markdown(f"**{card}**, {len(records)} records, flow seconds per utterance, median (lowest–highest)\n\n"
                 "| flow | seconds |\n|---|---|\n" + "\n".join(f"| {form} | {s.text()} |" for form, s in flow.items())))

# %%
# NBVAL_CHECK_OUTPUT
print("graphs faster than eager, float16 faster than graphs, in every record:",
      all(r["flow_graphs"]["stages_s"]["s3gen_flow"] < r[eager_rung(r)]["stages_s"]["s3gen_flow"]
          and r["flow_half"]["stages_s"]["s3gen_flow"] < r["flow_graphs"]["stages_s"]["s3gen_flow"] for r in records))

# %% [markdown]
# The same fp32 kernels replayed from graphs take less than half the time: the eager flow waits for Python to launch them.
# float16 then pays, because the GPU's own time is what is left.
#
# ### Padded to the bucket, the same mels
#
# On the CPU there are no graphs, but the padding is the same, so the check runs here.

# %%
tts = load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(voice_path("alto")))
tokens = torch.randint(0, 6561, (45,), generator=torch.Generator().manual_seed(0))


def flow_mels(model, seed=0):
    torch.manual_seed(seed)  # the flow's starting noise
    with torch.inference_mode():
        return model.s3gen.flow_inference(tokens, ref_dict=model.conds.gen, finalize=True)


plain = flow_mels(tts)
bucketed = load_tts(preset="tiny", device="cpu")  # steps change a model in place
bucketed.prepare_conditionals(str(voice_path("alto")))
apply_s3gen_steps(bucketed, ["flow_graphs"])
frames = 2 * (tts.conds.gen["prompt_token"].size(-1) + tokens.numel())
print(f"{frames} frames padded to {-(-frames // FRAME_BUCKET) * FRAME_BUCKET}")

# %%
# NBVAL_CHECK_OUTPUT
difference = (flow_mels(bucketed) - plain).abs().max().item()
print("padded to the bucket, same mels as unpadded:", difference < 1e-5)

# %% [markdown]
# ### Half precision, measured
#
# The estimator's values are small, so float16's extra significand bits buy more than bfloat16's range.
# `half_flow_error` runs the flow twice on the same tokens and noise, fp32 and half.
# It returns the relative L2 difference of the mels.

# %%
errors = {str(dtype): half_flow_error(tts, tokens, dtype=dtype) for dtype in (torch.bfloat16, torch.float16)}
display(Markdown("| estimator dtype | mel difference from fp32 (tiny, CPU) |\n|---|---|\n"
                 + "\n".join(f"| {k} | {v:.2%} |" for k, v in errors.items())))
gpu_checks = [d["checks"] for _, d in results.committed(folder="e2e") if "half_flow_within_tolerance" in d.get("checks", {})]

# %%
# NBVAL_CHECK_OUTPUT
print("float16 closer to fp32 than bfloat16:", errors["torch.float16"] < errors["torch.bfloat16"])
print("float16 within tolerance here:", errors["torch.float16"] <= HALF_FLOW_TOLERANCE)
print("float16 within tolerance in every GPU record:", all(c["half_flow_within_tolerance"] for c in gpu_checks))

# %% [markdown]
# ### Fewer kernels: what graphs leave
#
# A CUDA graph takes away the host's cost of launching, not the GPU's cost of running one kernel after another.
# A flow run of the graphed float16 estimator is some 14,600 kernels, most of them tiny.
# Three steps cut that count without changing what is computed:
#
# - `hifigan_compiled`: HiFi-GAN's weight norms are folded once, bit for bit, and its convolution stack is compiled for every length at once.
# - `flow_fused_projections`: q, k and v as one matmul in each self-attention.
# - `flow_compiled`: the estimator's blocks compiled, then captured as before. Norms, activations, residuals and masks fuse.
#
# Milliseconds for a cached voice across the records that measured all three, median (lowest–highest):

# %%
compiled_steps = ("voice_encoders_on_host", "hifigan_compiled", "flow_fused_projections", "flow_compiled")
cached = [r for r in records if all("cached_voice" in r.get(name, {}) for name in compiled_steps)]
rows = ["| rung | flow ms | HiFi-GAN ms | end to end ms |", "|---|---|---|---|"]
for name in compiled_steps:
    stage = lambda key: spread.of(r[name]["cached_voice"]["stages_s"][key] * 1e3 for r in cached).text()  # noqa: E731
    total = spread.of(r[name]["cached_voice"]["e2e_s"] * 1e3 for r in cached).text()
    rows.append(f"| {name} | {stage('s3gen_flow')} | {stage('hifigan')} | {total} |")
display(Markdown(f"{len(cached)} records\n\n" + "\n".join(rows)))

# %%
# NBVAL_CHECK_OUTPUT
cv = lambda r, name, key: r[name]["cached_voice"]["stages_s"][key]  # noqa: E731
print("compiled HiFi-GAN faster, in every record:",
      all(cv(r, "hifigan_compiled", "hifigan") < cv(r, "voice_encoders_on_host", "hifigan") for r in cached))
print("compiled flow blocks faster, in every record:",
      all(cv(r, "flow_compiled", "s3gen_flow") < cv(r, "hifigan_compiled", "s3gen_flow") for r in cached))

# %% [markdown]
# The price is the compiles: the first request after each step pays them, a server once.
# Inductor's on-disk cache shortens later starts.
#
# ### Listen
#
# The same T3 tokens through S3Gen as shipped and with every S3Gen step on.
# The synthetic model's random weights make noise, not speech; what matters is that the two match.

# %%
apply_s3gen_steps(bucketed, S3GEN_STEPS)
text = "The waveform side, made fast without changing what it computes."
torch.manual_seed(1)
before = synthesize(tts, text, max_new_tokens=50, watermark=False)
torch.manual_seed(1)
after = synthesize(bucketed, text, max_new_tokens=50, watermark=False)
display(Audio(before.wav, rate=before.sample_rate), Audio(after.wav, rate=after.sample_rate))

# %%
# NBVAL_CHECK_OUTPUT
rel = float(np.linalg.norm(after.wav - before.wav) / np.linalg.norm(before.wav))
print("same tokens:", torch.equal(before.speech_tokens, after.speech_tokens),
      "| same length:", len(after.wav) == len(before.wav), "| waveforms within 5% of each other:", rel < 0.05)

# %% [markdown]
# ### Memory for a cached voice
#
# About half of S3Gen's weights are its speech tokenizer and speaker encoder.
# They only turn a reference recording into conditionals.
# A server that keeps prepared voices (`voices.VoiceCache`) never runs them for a request.
# With `voice_encoders_on_host` they live in host memory and visit the GPU only while a voice is prepared.

# %%
memory = [r for r in records if "cached_voice" in r.get("voice_encoders_on_host", {}) and "cached_voice" in r.get("encoder_graphs", {})]
peak = {name: spread.of(r[name]["cached_voice"]["peak_vram_mib"] for r in memory) for name in ("encoder_graphs", "voice_encoders_on_host")}
print(f"peak MiB for a cached voice over {len(memory)} records: {peak['encoder_graphs'].text()} -> "
      f"{peak['voice_encoders_on_host'].text()} with the voice encoders on the host")

# %%
# NBVAL_CHECK_OUTPUT
print("lower peak with the voice encoders on the host, in every record:",
      all(r["voice_encoders_on_host"]["cached_voice"]["peak_vram_mib"] < r["encoder_graphs"]["cached_voice"]["peak_vram_mib"]
          for r in memory))

# %% [markdown]
# ### Against the end-to-end goals
#
# For a cached voice, on the latest record's card.

# %%
streamed = [(p, d) for p, d in results.committed(folder="e2e") if {"stream", "many"} <= set(d.get("end_to_end", {}))]
goals = report.end_to_end_rows(doc, streamed[-1][1])
display(Markdown("| figure | goal | measured | met |\n|---|---|---|---|\n"
                 + "\n".join(f"| {g['figure']} | {results.fmt(g['goal'])} | {results.fmt(g['measured'])} | "
                             f"{'yes' if g['met'] else 'no'} |" for g in goals)))

# %% [markdown]
# ## Summary
#
# - Once T3 is one graph per token, S3Gen's flow is the largest stage; replayed from graphs per length bucket it takes less than half the time.
# - Padding to a bucket changes nothing the model computes; float16 suits the estimator better than bfloat16 and stays within tolerance.
# - Compiling HiFi-GAN and the estimator's blocks cuts the kernels that graphs leave, and keeping the voice encoders on the host lowers the peak memory.
#
# ## Exercises
#
# **1. Change the bucket.**
# Build a `BucketedEstimator` with a bucket of 16 frames instead of `FRAME_BUCKET`.
# The mels must not change.

# %%
small_buckets = load_tts(preset="tiny", device="cpu")
small_buckets.prepare_conditionals(str(voice_path("alto")))
small_buckets.s3gen.flow.decoder.estimator = BucketedEstimator(small_buckets.s3gen.flow.decoder.estimator, frame_bucket=16)
difference_16 = (flow_mels(small_buckets) - plain).abs().max().item()
print(f"largest difference with 16-frame buckets: {difference_16:.1e}")
assert difference_16 < 1e-5

# %% [markdown]
# **2. A harsher measure.**
# Compute the waveform difference of the two syntheses above sample by sample.
# Why is the tolerance stated on the mels and not on the samples?
# Hint: with real weights, a small change of phase is a large difference between samples that sound the same.
#
# **3. Fewer flow steps.**
# `s3gen_steps.fewer_flow_steps_error` measures how far 5 flow steps land from 10.
# Notebook 08 uses it; try it here on `tokens[None]`.
#
# Next: [08 · streaming and batching](08_streaming_and_batching.ipynb).
