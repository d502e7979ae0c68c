# %% [markdown]
# # 07 · S3Gen: the waveform side
#
# Once T3 runs from one CUDA graph, a request's time moves to S3Gen: its flow (a
# conformer encoder, then ten Euler steps of a CFM estimator, a U-Net run on the
# CFG pair), HiFi-GAN and the watermark. This notebook makes that side fast
# without changing what it computes, in the ladder's order:
#
# 1. `flow_graphs`: the estimator replayed from CUDA graphs, one per length bucket;
# 2. `flow_half`: the estimator in float16, its difference from fp32 measured;
# 3. `watermark_on_device`: perth's network on the GPU;
# 4. `encoder_graphs`: the flow's encoder from graphs too, per token bucket (checked
#    here; on an H100 its mels are within the GPU test's 1e-3 relative tolerance);
# 5. `voice_encoders_on_host`: S3Gen's tokenizer and speaker encoder kept in host
#    memory, on the GPU only while a voice is prepared;
# 6. `hifigan_compiled`: HiFi-GAN's convolution stack under torch.compile;
# 7. `flow_fused_projections`: the estimator's q, k and v as one matmul;
# 8. `flow_compiled`: the estimator's blocks under torch.compile, inside the graphs;
# 9. batched flow: one flow run for many utterances of one voice.
#
# All in `chatterbox_lab/s3gen_steps.py` and `pipeline.tokens_to_speeches`; the GPU
# figures come from the latest committed records in `data/results/e2e/` (each plot
# names its card), the checks run here on a CPU with the `tiny` preset.

# %%
import numpy as np
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.records import report, results
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.registry import S3GEN_STEPS
from chatterbox_lab.s3gen.s3gen_steps import (FRAME_BUCKET, HALF_FLOW_TOLERANCE, BucketedEstimator, apply_s3gen_steps,
                                              half_flow_error)
from chatterbox_lab.pipeline.voices import voice_path

# %% [markdown]
# ## Where the time goes (full preset, on a GPU)
#
# One 10-second utterance (256 tokens) per rung: upstream as shipped, T3 with every
# step past the guide (the latest record's T3 rung), then S3Gen's steps one by one with that
# same T3 decoder. Once T3 is compiled, the flow is the largest stage.

# %%
path, doc = results.latest_with("e2e", ("upstream_fp32", S3GEN_STEPS[0]))
prov = doc["provenance"]
fast = {name: r for name, r in doc["rungs"].items() if name != "upstream_fp32"}
report.plot_stages({name: r["stages_s"] for name, r in fast.items()},
                   title=f"{prov['gpu']}, {prov['tokens']} tokens, seconds per stage ({path.name})");

# %%
rows = ["| rung | e2e s | RTF | flow s | HiFi-GAN s | watermark s | peak VRAM MiB |", "|---|---|---|---|---|---|---|"]
for name, r in doc["rungs"].items():
    st = r["stages_s"]
    rows.append(f"| {name} | {r['e2e_s']:.3f} | {r['rtf']:.3f} | {st['s3gen_flow']:.3f} | {st['hifigan']:.3f} | "
                f"{st['watermark']:.3f} | {r['peak_vram_mib']:,.0f} |")
display(Markdown("\n".join(rows)))
flow = {name: r["stages_s"]["s3gen_flow"] for name, r in doc["rungs"].items()}
t3_rung = [name for name in doc["rungs"] if name not in ("upstream_fp32", *S3GEN_STEPS)][-1]  # eager S3Gen
print(f"flow: {flow[t3_rung]:.3f} s eager fp32 -> {flow['flow_graphs']:.3f} s from graphs "
      f"-> {flow['flow_half']:.3f} s in float16")
assert flow["flow_graphs"] < flow[t3_rung] and flow["flow_half"] < flow["flow_graphs"]

# %% [markdown]
# The same fp32 kernels replayed from graphs take less than half the time: the
# eager flow waits for Python to launch them. float16 then pays, because the GPU's
# own time is what is left.
#
# ## Graphs per length bucket
#
# A CUDA graph replays fixed shapes, but every utterance has its own length. The
# estimator's frames are padded to the next multiple of `FRAME_BUCKET` with masked
# frames, so one graph serves every length in its bucket. That changes nothing
# the model computes: its convolutions are causal, its attention masks padded
# keys, and every block multiplies by the mask. On the CPU there are no graphs,
# but the padding is the same, so the check runs here.

# %%
tts = load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(voice_path("alto")))
tokens = torch.randint(0, 6561, (45,), generator=torch.Generator().manual_seed(0))


def flow_mels(model, seed=0):
    torch.manual_seed(seed)  # the flow's starting noise
    with torch.inference_mode():
        return model.s3gen.flow_inference(tokens, ref_dict=model.conds.gen, finalize=True)


plain = flow_mels(tts)
frames = 2 * (tts.conds.gen["prompt_token"].size(-1) + tokens.numel())
print(f"{frames} frames padded to {-(-frames // FRAME_BUCKET) * FRAME_BUCKET}")

# %%
# NBVAL_CHECK_OUTPUT
bucketed = load_tts(preset="tiny", device="cpu")  # steps change a model in place
bucketed.prepare_conditionals(str(voice_path("alto")))
apply_s3gen_steps(bucketed, ["flow_graphs"])
assert isinstance(bucketed.s3gen.flow.decoder.estimator, BucketedEstimator)
difference = (flow_mels(bucketed) - plain).abs().max().item()
print("padded to the bucket, same mels as unpadded:", difference < 1e-5)
assert difference < 1e-5

# %% [markdown]
# On the GPU, `tests/test_gpu.py` checks the same with graphs, that one graph
# serves two lengths of one bucket and that a flow run is ten graph launches
# (recorded runs in `data/results/gpu-tests/`).
#
# ## Half precision, measured
#
# The estimator's numbers are small, so float16's extra mantissa bits buy more
# than bfloat16's range. `half_flow_error` runs the flow twice on the same tokens
# and noise, fp32 and half, and gives the relative L2 difference of the mels.

# %%
errors = {str(dtype): half_flow_error(tts, tokens, dtype=dtype) for dtype in (torch.bfloat16, torch.float16)}
display(Markdown("| estimator dtype | mel difference from fp32 (tiny, CPU) |\n|---|---|\n"
                 + "\n".join(f"| {k} | {v:.2%} |" for k, v in errors.items())))
print(f"full preset on the {prov['gpu']}: float16 {doc['checks']['half_flow_mel_rel_error']:.2%} "
      f"(tolerance {HALF_FLOW_TOLERANCE:.0%})")

# %%
# NBVAL_CHECK_OUTPUT
print("float16 closer to fp32 than bfloat16:", errors["torch.float16"] < errors["torch.bfloat16"])
print("float16 within tolerance here and on the GPU:",
      errors["torch.float16"] <= HALF_FLOW_TOLERANCE and doc["checks"]["half_flow_within_tolerance"])
assert errors["torch.float16"] < errors["torch.bfloat16"] and errors["torch.float16"] <= HALF_FLOW_TOLERANCE
assert doc["checks"]["half_flow_within_tolerance"]

# %% [markdown]
# ## Fewer kernels: what graphs leave
#
# A CUDA graph takes away the host's cost of launching, not the GPU's cost of
# running one kernel after another: each of a replay's kernels still starts, ramps
# up and drains. A flow run of the graphed float16 estimator is some 14,600 kernels
# (ten calls; the GPU tests count them), most of them tiny, so its time barely
# depends on the utterance's length. Three steps cut that count without changing
# what is computed:
#
# - `hifigan_compiled`: HiFi-GAN recomputes each weight norm on every call and runs
#   each Snake activation as six kernels. Its norms are folded once (bit for bit) and
#   its convolution stack is compiled for every length at once (dynamic shapes);
#   its random source stays eager, so it draws upstream's numbers.
# - `flow_fused_projections`: q, k and v as one matmul in each self-attention.
# - `flow_compiled`: the estimator's transformer and resnet blocks compiled, each
#   kind once (its transformer blocks share one compiled graph), then captured as
#   before. Norms, activations, residuals and masks fuse; matmuls, attentions and
#   convolutions stay one kernel each.
#
# Times for a cached voice, from the same record:

# %%
compiled_steps = ("voice_encoders_on_host", "hifigan_compiled", "flow_fused_projections", "flow_compiled")
rows = ["| rung | flow ms | HiFi-GAN ms | e2e ms | S3Gen warm-up s (compiles, captures) |", "|---|---|---|---|---|"]
for name in compiled_steps:
    r = doc["rungs"][name]
    st = r["cached_voice"]["stages_s"]
    rows.append(f"| {name} | {st['s3gen_flow'] * 1e3:.1f} | {st['hifigan'] * 1e3:.1f} | "
                f"{r['cached_voice']['e2e_s'] * 1e3:.0f} | {report.s3gen_warmup_s(r):.1f} |")
display(Markdown("\n".join(rows)))
stage = {name: doc["rungs"][name]["cached_voice"]["stages_s"] for name in compiled_steps}
assert stage["hifigan_compiled"]["hifigan"] < stage["voice_encoders_on_host"]["hifigan"]
assert stage["flow_compiled"]["s3gen_flow"] < stage["hifigan_compiled"]["s3gen_flow"]

# %% [markdown]
# The price is the compiles, in the warm-up column: the first request after each
# step pays them (Inductor's on-disk cache shortens later starts), a server once.
#
# ## Listen
#
# The same T3 tokens (same seed) through S3Gen as shipped and with every S3Gen
# step on. The synthetic model's random weights make noise, not speech; what
# matters is that the two match.

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
same_tokens = torch.equal(before.speech_tokens, after.speech_tokens)
rel = float(np.linalg.norm(after.wav - before.wav) / np.linalg.norm(before.wav))
print("same tokens:", same_tokens, "| same length:", len(after.wav) == len(before.wav),
      "| waveforms within 5% of each other:", rel < 0.05)
assert same_tokens and len(after.wav) == len(before.wav) and rel < 0.05

# %%
print(f"waveform relative difference: {rel:.1e}")

# %% [markdown]
# The tolerance is stated on the mels, what the flow makes; a waveform's samples
# are a harsher measure with real weights, where a small change of phase is a
# large difference between samples that sound the same.
#
# ## Many utterances, and the first audio of a stream
#
# `pipeline.synthesize_many` decodes a batch in T3, then runs the flow once for
# each voice's utterances of the batch (`tokens_to_speeches`). Upstream's batched
# flow pads the shorter rows, and its encoder's look-ahead convolution then reads
# that padding into their last frames, which attention spreads to every frame;
# `padding_zeroed` zeroes it, so each row's mels are the ones it gets alone
# (`tests/test_long_text.py` compares them with the noise set to zero). HiFi-GAN
# and the watermark still run per utterance.

# %%
streamed = [(p, d) for p, d in results.committed(folder="e2e") if {"stream", "many"} <= set(d.get("end_to_end", {}))]
e2e_path, e2e_doc = streamed[-1]
many, stream = e2e_doc["end_to_end"]["many"], e2e_doc["end_to_end"]["stream"]
report.plot_stages({f"{many['utterances']} utterances": many["stages_s"],
                    "first streamed piece": stream["first_piece_stages_s"]},
                   title=f"{e2e_doc['provenance']['gpu']}, seconds per stage ({e2e_path.name})");
print(f"{many['utterances']} utterances: {many['audio_s']:.0f} s of audio in {many['wall_s']:.2f} s, "
      f"{many['x_realtime']:.0f}x real time; first streamed audio {stream['first_audio_s'] * 1e3:.0f} ms "
      f"after the request")

# %% [markdown]
# ## Memory for a cached voice (`voice_encoders_on_host`)
#
# Of S3Gen's weights in the full preset, about half are its speech tokenizer and
# speaker encoder, and they only turn a reference recording into conditionals.
# A server that keeps prepared voices (`voices.VoiceCache`) never runs them for a
# request. With `voice_encoders_on_host` they live in host memory and visit the
# GPU only inside `voices.prepare_voice`. Each S3Gen rung of the record was also
# timed on requests with the voice already prepared (`cached_voice`), which is
# what issue 6's goals are about. A new voice pays for copying the encoders over
# and back: the rung's own row re-prepares the voice on every request.

# %%
rows = ["| rung | e2e s, voice prepared each time | e2e s, cached voice | peak MiB, prepared each time | "
        "peak MiB, cached voice | MiB held before a request |", "|---|---|---|---|---|---|"]
cached = {name: r for name, r in doc["rungs"].items() if "cached_voice" in r}
for name, r in cached.items():
    c = r["cached_voice"]
    rows.append(f"| {name} | {r['e2e_s']:.3f} | {c['e2e_s']:.3f} | {r['peak_vram_mib']:,.0f} | "
                f"{c['peak_vram_mib']:,.0f} | {c['resident_before_mib']:,.0f} |")
display(Markdown("\n".join(rows)))
if "voice_encoders_on_host" in cached:
    before, after = (cached[n]["cached_voice"]["peak_vram_mib"] for n in ("encoder_graphs", "voice_encoders_on_host"))
    print(f"peak for a cached voice: {before:,.0f} MiB -> {after:,.0f} MiB with the voice encoders on the host")
    assert after < before

# %% [markdown]
# What is held before a request, by part (`memory.resident_parts_mib`, the last
# rung): weights per model, the KV cache, the CUDA graphs' pools, and what is left.
# Graph pools are reserved, not allocated: their intermediates are free between
# replays but kept for the next one, so they count towards what `nvidia-smi` shows,
# not towards `peak_vram_mib` (`torch.cuda.max_memory_allocated`).
#
# The "rest" was once 390 MiB: every capture warmed up on a new side stream, and
# cuBLAS keeps a workspace (32 MiB on an H200, measured by the GPU tests) for each
# stream it has run on, for the life of the process. All captures now warm up on
# one stream (`graphed_calls.warmup_stream`).

# %%
parts = list(cached.values())[-1]["cached_voice"].get("resident_parts_mib")
if parts:
    display(Markdown("| part | MiB |\n|---|---|\n" + "\n".join(f"| {k} | {v:,.1f} |" for k, v in parts.items())))
    assert parts["other_allocated"] < 200

# %% [markdown]
# ## Against issue 6's goals
#
# For a cached voice, on the record's card. T3 is most of a 10-second utterance's
# time (its decode rate is issue 5's work); the many-utterance figure is bound by
# per-utterance vocoding and by T3 batches of 64, far from what 2,000x needs.

# %%
goals = report.end_to_end_rows(doc, e2e_doc)
display(Markdown("| figure | goal | measured | met |\n|---|---|---|---|\n"
                 + "\n".join(f"| {g['figure']} | {results.fmt(g['goal'])} | {results.fmt(g['measured'])} | "
                             f"{'yes' if g['met'] else 'no'} |" for g in goals)))
