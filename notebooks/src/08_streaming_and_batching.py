# %% [markdown]
# # 08 · Streaming, long text and many utterances
#
# A listener hears audio, not tokens.
# This notebook gets audio to them sooner, for any length of text, and for many utterances at once.
# Terms are in the [glossary](../docs/glossary.md).
#
# ## What you will learn
#
# - How streaming hands T3's tokens to S3Gen in chunks, and what a listener waits for.
# - How long text is split at sentence ends without losing a word.
# - How a session decodes the requests that wait together, each with its own values.
# - How fast a batch could go, from the FLOPs of one utterance and the card's matmul rate.
#
# **Prerequisites:** [04 · compile](04_compile.ipynb) and [07 · S3Gen](07_s3gen.ipynb).
#
# **Runtime:** about a minute on a CPU (the `tiny` preset); GPU figures come from committed records.

# %%
import numpy as np
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab import TTSSession, show_code
from chatterbox_lab.decode.decoder import T3Decoder
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.long_text import split_text
from chatterbox_lab.pipeline.streaming import playback_waits, seam_error, stream_speech
from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN, synthesize, synthesize_long, synthesize_many
from chatterbox_lab.pipeline.voices import voice_path
from chatterbox_lab.records import report, results, spread
from chatterbox_lab.s3gen.s3gen_steps import fewer_flow_steps_error
from chatterbox_lab.sampling import SamplingParams

tts = load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(voice_path("alto")))
decoder = T3Decoder(tts.t3, ("static_cache", "embed_cache"), max_new_tokens=128)
text = "Streaming starts to speak before the sentence is decoded."

# %% [markdown]
# ## Why
#
# Three ways of getting audio to a listener sooner, or in bulk, each a plain function of the package:
#
# - **Streaming** (`stream_speech`): T3 hands over its tokens in chunks, and S3Gen turns each chunk into sound before T3 goes on. The first audio is ready after one chunk, not after the whole utterance.
# - **Long text** (`synthesize_long`): any length, split at sentence ends into chunks that each fit one utterance, joined with short fades and pauses.
# - **Many utterances** (`synthesize_many`): T3 decodes a batch together, each utterance with its own voice.
#
# Decoding one utterance is bound by memory: each step reads every weight for one token.
# A batch reads the weights once for many tokens, so it is bound by arithmetic instead.
# Its ceiling is the FLOPs of one utterance over the card's matmul rate.
#
# Here on a CPU with the `tiny` preset the numbers check the mechanics, not the speed.
# `bench --stream --many N` measures them on a GPU.

# %% [markdown]
# ## The change
#
# `stream_speech` runs the flow over all tokens so far for each chunk.
# The frames of the last few tokens wait for the next chunk, since they depend on what follows.
# Two pieces meet in a short cross-fade. `split_text` packs sentences into chunks.

# %%
show_code(stream_speech, split_text)

# %% [markdown]
# ## Proof
#
# ### Streaming
#
# A first chunk of 8 tokens, heard soonest, then chunks of 32 tokens (1.28 s), which mean fewer flow runs.
# The first piece is short: it only has to play until the second is ready.
# `playback_waits` says how long a listener who starts at the first piece waits for each later one.
# On this CPU, with a model far slower than real time, the waits are long.

# %%
torch.manual_seed(0)
pieces = list(stream_speech(tts, text, decoder=decoder, max_new_tokens=96, chunk_tokens=32, watermark=False))
for i, piece in enumerate(pieces):
    print(f"piece {i}: {len(piece.wav) / piece.sample_rate:.2f} s of audio, ready {piece.ready_s:.2f} s after the request")
print("playback waits (s):", [round(wait, 2) for wait in playback_waits(pieces)])
streamed = np.concatenate([p.wav for p in pieces])
Audio(streamed, rate=pieces[0].sample_rate)

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
whole = synthesize(tts, text, decoder=decoder, max_new_tokens=96, watermark=False).wav
print("pieces arrive in order, the first well before the last:", pieces[0].ready_s < pieces[-1].ready_s)
print("joined pieces as long as the whole utterance:", len(streamed) == len(whole))

# %% [markdown]
# `seam_error` is the RMS of the difference from the whole utterance, relative to the RMS of the whole.
# The synthetic flow has random weights and looks at the whole sequence, so early audio changes when later tokens arrive.
# The figure here says little about real weights, where a frame depends mostly on the tokens near it.

# %%
print(f"seam error (synthetic weights): {seam_error(streamed, whole):.2f}")

# %% [markdown]
# ### Long text
#
# `split_text` cuts at sentence ends and packs sentences into chunks of at most `max_chars`.
# A sentence too long for one chunk is cut at a clause mark, else a space, never inside a word.

# %%
chapter = ("The lab opened at eight, and by nine every bench held a card that hummed. "
           "Each engineer had a question, a notebook and a number that would not sit still, "
           "so they measured it again, warmed it up, synchronized, took the median of five, and "
           "wrote the card's name next to it before anyone could ask which one. Then they "
           "profiled it. ") * 3
chunks = split_text(chapter, 300)
display(Markdown("\n".join(f"{i}. ({len(c)} chars) {c[:70]}…" for i, c in enumerate(chunks))))

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
long = synthesize_long(tts, chapter, decoder=decoder, max_new_tokens=8, watermark=False)
print(f"{len(chapter)} characters in {len(chunks)} chunks, every chunk within 300:", all(len(c) <= 300 for c in chunks))
print("every word kept, in order:", " ".join(chunks).split() == chapter.split())
print("8 tokens per chunk:", long.speech_tokens.numel() == 8 * len(chunks))

# %% [markdown]
# ### Many utterances together
#
# Four texts in two voices, decoded two at a time by a batched decoder (`streams=2`).
# S3Gen's flow then runs once for each voice's utterances of a batch.
# HiFi-GAN and the watermark run once per group of utterances of equal length, since neither masks padding.
# With the most likely token always chosen (`top_p` tiny), every utterance gets the tokens it gets alone.

# %%
greedy = SamplingParams(top_p=1e-6)
texts = ["One for the alto.", "One for the tenor, a little longer.", "Alto again.", "And the tenor."]
voices = ["alto", "tenor", "alto", "tenor"]
many = synthesize_many(tts, texts, voices, decoder=T3Decoder(tts.t3, ("static_cache", "embed_cache"), streams=2),
                       max_new_tokens=16, sampling=greedy, watermark=False)
print(f"{len(many.speeches)} utterances, {many.audio_s:.2f} s of audio in {many.wall_s:.2f} s: "
      f"{many.x_realtime:.1f}x real time on this CPU")

# %%
# NBVAL_CHECK_OUTPUT
alone = [synthesize(tts, t, voice=voice_path(v), decoder=decoder, max_new_tokens=16, sampling=greedy,
                    watermark=False).speech_tokens for t, v in zip(texts, voices)]
print("each utterance as when synthesized alone:", [torch.equal(a, s.speech_tokens) for a, s in zip(alone, many.speeches)])

# %% [markdown]
# ### Requests served together
#
# A server's requests arrive one by one, not as a list.
# `TTSSession(batch_requests=N)` decodes the requests that wait while its worker is busy as one batch.
# Each request keeps its own text, voice, sampling values and length.
# Here four requests arrive at once: the first may find the worker free, and the rest wait and decode together.

# %%
session = TTSSession(tts=tts, batch_requests=4)
lengths = (8, 12, 16, 20)
futures = [session.submit(t, v, sampling=SamplingParams(temperature=temperature), max_new_tokens=n)
           for t, v, temperature, n in zip(texts, voices, (0.6, 0.8, 1.0, 1.2), lengths)]
served = [future.result() for future in futures]
session.close()
print("batches served, by number of requests:", dict(session.batches_served))

# %%
# NBVAL_CHECK_OUTPUT
print("some requests decoded together:", max(session.batches_served) > 1)
print("each request its own length:", [len(s.wav) for s in served] == [n * SAMPLES_PER_TOKEN for n in lengths])

# %% [markdown]
# ### How fast could a batch go?
#
# The bench counts one utterance's floating-point operations on upstream's eager modules with PyTorch's FLOP counter.
# It times a large matmul on the same card.
# Their ratio is the fastest a batch could make audio if every operation ran at that rate and nothing else took time.
# The flow dominates: twenty estimator calls (ten Euler steps, CFG pair), most of it attention over the voice's prompt frames and the new ones.
# The table is the latest record's:

# %%
flop_path, flop_doc = report.latest_flop_record()
display(Markdown(f"`{flop_path.name}`, {flop_doc['provenance']['gpu']}:\n\n" + report.flop_table(flop_doc)))
display(Markdown(report.many_line(flop_doc["provenance"]["gpu"], flop_doc)))

# %% [markdown]
# Across every record with FLOP counts, the measured rate and the ceiling:

# %%
flop_records = [d["end_to_end"]["many"] for _, d in results.committed(folder="e2e")
                if "flops" in d and "x_realtime_ceiling" in d.get("end_to_end", {}).get("many", {})]
measured = spread.of(m["x_realtime"] for m in flop_records)
ceiling = spread.of(m["x_realtime_ceiling"] for m in flop_records)
print(f"{len(flop_records)} records: measured {measured.text(suffix='x')} real time; ceiling {ceiling.text(suffix='x')}")

# %%
# NBVAL_CHECK_OUTPUT
print("measured below the arithmetic ceiling in every record:", all(m["x_realtime"] < m["x_realtime_ceiling"] for m in flop_records))
print("with upstream's 10 flow steps the ceiling stays below 2,000x real time:", ceiling.high < 2000)

# %% [markdown]
# Fewer Euler steps cut the flow's arithmetic in proportion and change the audio.
# It is the same ODE integrated on a coarser grid.
# It is an explicit option (`flow_steps=` of `synthesize` and `synthesize_many`), never a default.
# Its difference from ten steps is measured on the same tokens and starting noise:

# %%
tokens = many.speeches[0].speech_tokens[None]
errors = {steps: fewer_flow_steps_error(tts, tokens, steps) for steps in (2, 5, 10)}
for steps, error in errors.items():
    print(f"{steps:>2} flow steps: mels {error:.1%} from 10 steps'")

# %%
# NBVAL_CHECK_OUTPUT
print("ten steps are upstream's own:", errors[10] == 0.0)
print("fewer steps, larger difference:", errors[2] > errors[5] > 0)

# %% [markdown]
# ## Summary
#
# - Streaming hands tokens to S3Gen in chunks, so the first audio is ready after one short chunk; the joined pieces are as long as the whole utterance.
# - A session decodes the requests that wait together, each with its own values and length.
# - Long text is split at sentence ends into chunks that fit one utterance, and every word is kept in order.
# - A batch is bound by arithmetic; across committed records it stays below its FLOP ceiling, which at ten flow steps is below 2,000x real time.
#
# ## Exercises
#
# **1. Change the chunk size.**
# Stream the same text with `chunk_tokens=16`.
# There are more pieces, and the joined audio still has the whole utterance's length.

# %%
torch.manual_seed(0)
finer = list(stream_speech(tts, text, decoder=decoder, max_new_tokens=96, chunk_tokens=16, watermark=False))
print(f"{len(finer)} pieces with 16-token chunks, {len(pieces)} with 32")
assert len(finer) > len(pieces) and sum(len(p.wav) for p in finer) == len(whole)

# %% [markdown]
# **2. A sentence longer than a chunk.**
# Split one long sentence with no full stop into chunks of 60 characters.
# Check that no word is cut.

# %%
sentence = "a long clause, then another one, and a third that runs on without a stop " * 3
parts = split_text(sentence, 60)
print(parts)
assert all(len(p) <= 60 for p in parts) and " ".join(parts).split() == sentence.split()

# %% [markdown]
# **3. Sampling changes the batch.**
# Run `synthesize_many` with the default sampling instead of `greedy`.
# Are the tokens still those of each utterance alone? Why not, with one random generator shared by the batch?
