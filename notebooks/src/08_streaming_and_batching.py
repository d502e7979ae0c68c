# %% [markdown]
# # 08 · Streaming, long text and many utterances
#
# A listener hears audio, not tokens. Three ways of getting it to them sooner or
# in bulk, each a plain function of the package:
#
# - **Streaming** (`streaming.stream_speech`): T3 hands over its tokens in chunks
#   (`T3Decoder.generate_stream`) and S3Gen turns each chunk into sound before T3
#   goes on (the two take turns). The first audio is ready after one chunk, not
#   after the whole utterance.
# - **Long text** (`pipeline.synthesize_long`): any length, split at sentence ends
#   into chunks that each fit one utterance, joined with short fades and pauses.
# - **Many utterances** (`pipeline.synthesize_many`): T3 decodes a batch of them
#   together, each with its own voice, and the result reports seconds of audio per
#   second of wall time (`x_realtime`).
#
# Here on a CPU with the `tiny` preset: the numbers check the mechanics, not the
# speed. `bench --stream --many N` measures them on a GPU.

# %%
import numpy as np
import torch
from IPython.display import Audio, Markdown, display

from chatterbox_lab.decode.decoder import T3Decoder
from chatterbox_lab.pipeline.long_text import split_text
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize, synthesize_long, synthesize_many
from chatterbox_lab.pipeline.streaming import playback_waits, seam_error, stream_speech
from chatterbox_lab.pipeline.voices import voice_path

tts = load_tts(preset="tiny", device="cpu")
tts.prepare_conditionals(str(voice_path("alto")))
decoder = T3Decoder(tts.t3, ("static_cache", "embed_cache"), max_new_tokens=128)
text = "Streaming starts to speak before the sentence is decoded."

# %% [markdown]
# ## Streaming
#
# A first chunk of 8 tokens, heard soonest, then chunks of 32 (1.28 s), which mean
# fewer flow runs. For every chunk the flow runs over all the tokens so far (its
# encoder and estimator look at the whole sequence), the frames of the last few
# tokens wait for the next chunk (they depend on what follows), the vocoder gets
# some frames of left context, and two pieces meet in a short cross-fade.
#
# The first piece is therefore short, about 0.2 s of sound: it only has to play until
# the second is ready. `playback_waits` says how long a listener who starts at the
# first piece waits for each later one; `bench --stream` records their sum (`wait_s`)
# on the GPU. On this CPU, with a model far slower than real time, the waits are long.

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
assert pieces[0].ready_s < pieces[-1].ready_s and len(streamed) == len(whole)

# %% [markdown]
# How close are the seams to the waveform made from all tokens at once?
# `seam_error` is the RMS of the difference relative to the RMS of the whole.
# The synthetic model's flow has random weights and looks at the whole
# sequence, so its audio for early tokens changes when later ones arrive; the
# figure here says little about real weights, where what a frame sounds like
# depends mostly on the tokens near it. `bench --stream` records it for the
# checkpoint it runs.

# %%
print(f"seam error (synthetic weights): {seam_error(streamed, whole):.2f}")

# %% [markdown]
# ## Long text
#
# `split_text` cuts at sentence ends and packs sentences into chunks of at most
# `max_chars`; a sentence too long for one chunk is cut at a clause mark, else
# a space, never inside a word.

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
assert long.speech_tokens.numel() == 8 * len(chunks)

# %% [markdown]
# ## Many utterances together
#
# Four texts in two voices, decoded two at a time by a batched decoder
# (`streams=2`); S3Gen's flow then runs once for each voice's utterances of a
# batch (`pipeline.tokens_to_speeches`), HiFi-GAN and the watermark once per group of
# utterances of equal length (`batched_waveforms`: neither masks padding). With the most likely
# token always chosen (`top_p` tiny) every utterance gets the tokens it gets alone.

# %%
from chatterbox_lab.sampling import SamplingParams

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
same = [torch.equal(a, s.speech_tokens) for a, s in zip(alone, many.speeches)]
print("each utterance as when synthesized alone:", same)
assert all(same)

# %% [markdown]
# ## How fast could a batch go?
#
# Decoding one utterance is bound by memory; a batch of many is bound by arithmetic. The bench
# counts one utterance's floating-point operations on upstream's eager modules
# (`flops.utterance_flops`, PyTorch's FLOP counter: matmuls, convolutions, attention) and times
# a large matmul on the same card (`roofline.matmul_rate`). Their ratio is the fastest a batch
# could make audio if every operation ran at that rate and nothing else took time
# (`flops.x_realtime_ceiling`). The flow dominates: twenty estimator calls (ten Euler steps,
# CFG pair) over the voice's prompt frames and the new ones, most of it attention across all of
# them. Figures from the latest GPU record:

# %%
# NBVAL_IGNORE_OUTPUT
from chatterbox_lab.records import report

flop_path, flop_doc = report.latest_flop_record()
display(Markdown(f"`{flop_path.name}`, {flop_doc['provenance']['gpu']}:\n\n" + report.flop_table(flop_doc)))
display(Markdown(report.many_line(flop_doc["provenance"]["gpu"], flop_doc)))

# %%
# NBVAL_CHECK_OUTPUT
measured, ceiling = flop_doc["end_to_end"]["many"]["x_realtime"], flop_doc["end_to_end"]["many"]["x_realtime_ceiling"]
print("the measured rate is below the arithmetic ceiling:", measured < ceiling)
print("with upstream's 10 flow steps the ceiling is below issue 6's 2,000x:", ceiling < 2000)
assert measured < ceiling < 2000

# %% [markdown]
# Fewer Euler steps cut the flow's arithmetic in proportion and change the audio: the same
# ODE integrated on a coarser grid. It is an explicit option (`flow_steps=` of `synthesize` and
# `synthesize_many`, `--many-flow-steps` of the bench), never a default, and its difference from
# upstream's ten steps is measured on the same tokens and starting noise
# (`s3gen_steps.fewer_flow_steps_error`). Here on the tiny model:

# %%
from chatterbox_lab.s3gen.s3gen_steps import fewer_flow_steps_error

tokens = many.speeches[0].speech_tokens[None]
errors = {steps: fewer_flow_steps_error(tts, tokens, steps) for steps in (2, 5, 10)}
for steps, error in errors.items():
    print(f"{steps:>2} flow steps: mels {error:.1%} from 10 steps'")

# %%
# NBVAL_CHECK_OUTPUT
print("ten steps are upstream's own:", errors[10] == 0.0)
print("fewer steps, larger difference:", errors[2] > errors[5] > 0)
assert errors[10] == 0.0 and errors[2] > errors[5] > 0
