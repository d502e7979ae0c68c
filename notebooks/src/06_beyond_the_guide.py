# %% [markdown]
# # 06 · Beyond the guide (in progress)
#
# The guide stops at a compiled step: one CUDA graph per token, about a fifth of
# what the card's memory bandwidth allows. This notebook follows the steps past
# it, each a flag of the same decoder (`decoder.BEYOND`):
#
# - `fused_projections`: q, k, v as one matmul and gate, up as another. At two
#   rows (the CFG pair) a matmul costs its weight bytes plus a fixed launch and
#   ramp-up; fusing pays that fixed cost once per group: 7 matmuls a layer become 4.
# - `sampling_in_graph`: sampling and the token write move inside the captured
#   step, so a token should cost one graph launch and nothing else on the host.
# - several utterances at once (`T3Decoder(streams=N)`): each is a CFG pair of rows
#   with its own prompt, position, repetition mask and stop; the weights are read
#   once for all of them.
#
# First the checks (CPU, tiny model), then the H100 measurements.

# %%
import torch
from IPython.display import Markdown, display

from chatterbox_lab import equivalence, results
from chatterbox_lab.decoder import BEYOND, T3Decoder, text_tokens_for
from chatterbox_lab.models import load_tts
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.voices import VoiceCache

tts = load_tts(preset="tiny", device="cpu")
voices = VoiceCache(tts)
tts.conds = voices.use("alto")
text_tokens = text_tokens_for(tts, "Every step is measured and checked against upstream.")
print("steps past the guide:", BEYOND)

# %% [markdown]
# ## Same tokens as upstream
#
# In fp32 neither step changes the math, so a seeded run must give upstream's
# tokens. The compiled step that samples inside the graph keeps PyTorch's own
# random-number kernel (Inductor would otherwise swap in its own generator:
# same distribution, different numbers).

# %%
# NBVAL_CHECK_OUTPUT
step_sets = [("static_cache", "embed_cache", "fused_projections"),
             ("static_cache", "embed_cache", "compiled", "fused_projections", "sampling_in_graph")]
verdicts = equivalence.token_identity(tts, text_tokens, step_sets, n=32, seed=3)
for steps, same in verdicts.items():
    print(f"{steps}: {'identical' if same else 'DIFFERENT'}")
assert all(verdicts.values())

# %% [markdown]
# ## Several utterances at once
#
# Three utterances with different voices and texts (so different prompt lengths)
# decode together. With sampling reduced to the most likely token (`top_p` tiny)
# there is no randomness left, so each must get exactly the tokens it gets alone.

# %%
# NBVAL_CHECK_OUTPUT
greedy = SamplingParams(top_p=1e-6)
steps = ("static_cache", "embed_cache", "fused_projections")
conds = [voices.use(v).t3 for v in ("alto", "tenor", "alto")]
texts = [text_tokens_for(tts, t) for t in ("A first sentence.", "The second one is longer than the first.", "Third!")]
together = T3Decoder(tts.t3, steps, streams=3).generate_batch(conds, texts, 24, greedy, stop_on_eos=False)
alone = T3Decoder(tts.t3, steps)
same = [torch.equal(alone.generate(c, t, 24, greedy, stop_on_eos=False).tokens, got)
        for c, t, got in zip(conds, texts, together.all_tokens)]
print("each utterance as when decoded alone:", same)
assert all(same)

# %% [markdown]
# ## Measured on an H100
#
# `python -m chatterbox_lab bench --rungs upstream_fp32 compiled fused_projections sampling_in_graph`
# runs these rungs in one process on one card. The committed runs are in
# `data/results/beyond/`; its README says what each run covers and what went wrong.

# %%
path, doc = results.committed(folder="beyond")[-1]
prov = doc["provenance"]
display(Markdown(f"**{prov['gpu']}**, torch {prov['torch']}, commit `{prov['git_commit'][:10]}`, "
                 f"{prov['date_utc']}, `{path.name}`"))
display(Markdown(results.markdown_table(doc, ("t3_decode_tok_s", "fraction_of_floor", "gpu_kernels_per_token",
                                               "host_launches_per_token", "cpu_ops_per_token", "compile_s"))))

# %% [markdown]
# What the table teaches:
#
# - Fusing the projections removes kernels from every token (printed below) and is
#   the first step past the guide's compiled rung: more of each step is spent
#   reading weights.
# - Sampling inside the graph should have removed the host's per-token work; on the
#   H100 it did remove half the CPU ops, yet added host launches and time. The
#   extra launches are no aten op, so they come from the graph replay itself (the
#   random-number generator's bookkeeping for a captured RNG kernel is the first
#   suspect). Diagnosing this needs a trace of that rung: `bench --trace-dir runs/`.
# - Still ahead: attention that reads only the filled cache with enough parallelism
#   for one query (a split-KV decode kernel), kernels that read these small weight
#   matrices nearer the bandwidth floor, and batch scaling measured on the GPU.

# %%
rungs = doc["rungs"]
compiled, fused = rungs["compiled"], rungs["fused_projections"]
print(f"fused projections: {compiled['gpu_kernels_per_token'] - fused['gpu_kernels_per_token']:.0f} fewer kernels "
      f"a token, {fused['t3_decode_tok_s'] / compiled['t3_decode_tok_s']:.2f}x the compiled rung's decode rate")
assert rungs["fused_projections"]["gpu_kernels_per_token"] < rungs["compiled"]["gpu_kernels_per_token"]
assert rungs["fused_projections"]["t3_decode_tok_s"] > rungs["compiled"]["t3_decode_tok_s"]
