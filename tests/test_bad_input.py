"""Every bad input is refused with a message that says what to do, and no output file is left.

One table: each row goes through `TTSSession.synthesize_to_file` (a library caller)
or `python -m chatterbox_lab say` (in-process: exit status 2, the message on stderr).
After each, the output directory must hold exactly what it held before: no file,
no temporary file, and a file that was already there unchanged.
"""
import io
import os
import re
import shutil
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_lab.__main__ import main
from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.serving.session import Speech, TTSSession
from chatterbox_lab.validation import MAX_NEW_TOKENS, MAX_TEXT_CHARS

TOKENS = 4
SESSION_TOKENS = 16
SR = 16_000
_t = np.arange(3 * SR) / SR
SPEECHY = (0.3 * np.sin(2 * np.pi * 180 * _t) * (1 + np.sin(2 * np.pi * 3 * _t))).astype(np.float32)


@pytest.fixture(scope="module")
def session(tiny_tts):
    # No bf16 (it would cast the shared model in place) and no compiled step (slower to
    # build than a few tokens take): the steps `say` uses on a CPU.
    conds = tiny_tts.conds
    s = TTSSession(tts=tiny_tts, steps=("static_cache", "embed_cache"), max_new_tokens=SESSION_TOKENS)
    yield s
    s.close()
    tiny_tts.conds = conds  # other tests expect the voice the fixture prepared


# Input files are made at test time, in the test's own directory: each maker takes that
# directory (checkpoint makers also the cached synthetic checkpoint) and returns what to pass.

def audio(wav, sr=SR, name="voice.wav"):
    def make(directory):
        sf.write(directory / name, wav, sr)
        return directory / name
    return make


def raw(data: bytes):
    def make(directory):
        (directory / "voice.wav").write_bytes(data)
        return directory / "voice.wav"
    return make


def nowhere(directory, source):
    return directory / "checkpoint"


def incomplete(directory, source):
    target = directory / "checkpoint"
    target.mkdir()
    (target / "t3_cfg.safetensors").write_bytes(b"")
    (target / "ve.safetensors").write_bytes(b"x")
    return target


def replacing(name, content):
    """The synthetic checkpoint `source` with `name` replaced by content(source)."""
    def make(directory, source):
        target = directory / "checkpoint"
        shutil.copytree(source, target, copy_function=os.symlink)
        # Unlinked first: writing through the link would corrupt the cached checkpoint.
        (target / name).unlink(missing_ok=True)
        (target / name).write_bytes(content(source))
        return target
    return make


def truncated_t3(source):
    return (source / "t3_cfg.safetensors").read_bytes()[:100]


def half_width_text_embedding(source):
    from safetensors.torch import load_file, save

    tensors = load_file(source / "t3_cfg.safetensors")
    tensors["text_emb.weight"] = tensors["text_emb.weight"][:, :64].contiguous()
    return save(tensors)


def conds_with_a_pickled_class(source):
    buffer = io.BytesIO()
    torch.save({"t3": {"speaker_emb": torch.zeros(1, 256)}, "gen": {"payload": threading.Lock}}, buffer)
    return buffer.getvalue()


def unreadable_tokenizer(source):
    return b'{"model": {"vocab": '


def tokenizer_without_stop(source):
    return (source / "tokenizer.json").read_bytes().replace(b'"[STOP]"', b'"[NOTSTOP]"')


def new_file(directory):
    return directory / "speech.wav"


def existing_file(directory):
    (directory / "speech.wav").write_bytes(b"an earlier take")
    return directory / "speech.wav"


def in_missing_directory(directory):
    return directory / "absent" / "speech.wav"


def a_directory(directory):
    (directory / "speech.wav").mkdir()
    return directory / "speech.wav"


def by_session(session, out, *, text, voice, sampling, max_new_tokens, checkpoint, exaggeration, seed):
    assert checkpoint == "synthetic", "checkpoint rows go through the command line"
    session.synthesize_to_file(out, text, voice, sampling=SamplingParams(**sampling), max_new_tokens=max_new_tokens,
                               exaggeration=exaggeration, seed=seed)


def by_cli(session, out, *, text, voice, sampling, max_new_tokens, checkpoint, exaggeration, seed):
    main(["say", text, "--out", str(out), "--voice", str(voice), "--checkpoint", str(checkpoint),
          "--device", "cpu", f"--max-new-tokens={max_new_tokens}", f"--exaggeration={exaggeration}",
          *([f"--seed={seed}"] if seed is not None else []),
          *(f"--{name.replace('_', '-')}={value}" for name, value in sampling.items())])


def row(drive, error, message, name, **request):
    return pytest.param(drive, request, error, message, id=name)


NAN, INF = float("nan"), float("inf")

BAD_INPUTS = [
    row(by_session, ValueError, "text is empty", "empty text", text=""),
    row(by_session, ValueError, "text is empty", "whitespace text", text=" \t\n"),
    row(by_session, ValueError, f"text is {MAX_TEXT_CHARS + 1} characters, over the limit of {MAX_TEXT_CHARS}",
        "text over the limit", text="x" * (MAX_TEXT_CHARS + 1)),
    row(by_session, ValueError, "text is not valid UTF-8", "non-UTF-8 text", text=b"caf\xe9"),
    row(by_cli, SystemExit, "text is not valid UTF-8", "non-UTF-8 argument", text=os.fsdecode(b"caf\xe9")),

    row(by_session, ValueError, "as audio", "voice that is not audio", voice=raw(b"RIFF but not really")),
    row(by_session, ValueError, "as audio", "voice file of 0 bytes", voice=raw(b"")),
    row(by_session, ValueError, "is 0.00 s long", "voice with no samples", voice=audio(np.zeros(0, np.float32))),
    row(by_session, ValueError, "is silent", "silent voice", voice=audio(np.zeros(3 * SR, np.float32))),
    row(by_session, ValueError, "is 0.50 s long; it must be at least 1 s", "voice under 1 s",
        voice=audio(SPEECHY[:SR // 2])),
    row(by_session, FileNotFoundError, "not found; bundled voices: alto, tenor", "unknown voice", voice="nobody"),
    row(by_session, ValueError, "is 301 s long, over the limit of 300 s", "voice over the length limit",
        voice=audio(np.tile(SPEECHY, 101)[:301 * SR])),
    row(by_cli, SystemExit, "is silent", "silent voice file", voice=audio(np.zeros(3 * SR, np.float32))),

    row(by_session, ValueError, "temperature must be in [0.01, 10], got 0.0", "temperature 0",
        sampling=dict(temperature=0.0)),
    row(by_session, ValueError, "temperature must be in [0.01, 10]", "negative temperature",
        sampling=dict(temperature=-1.0)),
    # Finite but extreme: each would overflow the sampling arithmetic into NaN probabilities.
    row(by_session, ValueError, "temperature must be in [0.01, 10], got 1e-300", "tiny temperature",
        sampling=dict(temperature=1e-300)),
    row(by_session, ValueError, "temperature must be in [0.01, 10]", "huge temperature",
        sampling=dict(temperature=1e300)),
    row(by_session, ValueError, "cfg_weight must be in [0, 10], got 1e+300", "huge cfg_weight",
        sampling=dict(cfg_weight=1e300)),
    row(by_session, ValueError, "repetition_penalty must be in [0.1, 10]", "huge repetition_penalty",
        sampling=dict(repetition_penalty=1e300)),
    row(by_session, ValueError, "repetition_penalty must be in [0.1, 10]", "tiny repetition_penalty",
        sampling=dict(repetition_penalty=1e-300)),
    row(by_session, ValueError, "top_p must be in (0, 1]", "top_p below 0", sampling=dict(top_p=-1e-300)),
    row(by_cli, SystemExit, "cfg_weight must be in [0, 10]", "huge cfg_weight argument",
        sampling=dict(cfg_weight=1e300)),

    row(by_session, ValueError, "exaggeration must be a finite number, got nan", "NaN exaggeration",
        exaggeration=NAN),
    row(by_session, ValueError, "exaggeration must be a finite number, got inf", "infinite exaggeration",
        exaggeration=INF),
    row(by_session, ValueError, "exaggeration must be in [0, 2], got -1", "negative exaggeration", exaggeration=-1),
    row(by_session, ValueError, "exaggeration must be in [0, 2], got 1e+300", "huge exaggeration",
        exaggeration=1e300),
    row(by_cli, SystemExit, "exaggeration must be a finite number", "NaN exaggeration argument", exaggeration=NAN),

    row(by_session, ValueError, "seed must be an integer from 0 to 2**64 - 1, got -1", "negative seed", seed=-1),
    row(by_session, ValueError, "seed must be an integer from 0 to 2**64 - 1, got 18446744073709551616",
        "seed over 64 bits", seed=2**64),
    row(by_session, ValueError, "seed must be an integer", "fractional seed", seed=1.5),
    row(by_cli, SystemExit, "seed must be an integer from 0 to 2**64 - 1", "seed over 64 bits argument",
        seed=10**30),

    row(by_session, ValueError, "the English model cannot represent: '你' (U+4F60), '好' (U+597D)", "Chinese text",
        text="你好"),
    row(by_session, ValueError, "cannot represent: 'ا' (U+0627)", "Arabic text", text="مرحبا"),
    row(by_session, ValueError, "use Chatterbox's multilingual model", "Hebrew text", text="שלום עולם"),
    row(by_session, ValueError, "cannot represent: '😀' (U+1F600)", "emoji", text="Hello 😀"),
    row(by_session, ValueError, "cannot represent: '\\x07' (U+0007)", "control character", text="Bell\x07 here."),
    row(by_cli, SystemExit, "use Chatterbox's multilingual model", "Chinese text argument", text="你好"),
    row(by_session, ValueError, "temperature must be a finite number", "NaN temperature",
        sampling=dict(temperature=NAN)),
    row(by_session, ValueError, "top_p must be a finite number", "infinite top_p", sampling=dict(top_p=INF)),
    row(by_session, ValueError, "top_p must be in (0, 1]", "top_p 0", sampling=dict(top_p=0.0)),
    row(by_session, ValueError, "top_p must be in (0, 1]", "top_p over 1", sampling=dict(top_p=1.5)),
    row(by_session, ValueError, "cfg_weight must be in [0, 10]", "negative cfg_weight", sampling=dict(cfg_weight=-0.5)),
    row(by_session, ValueError, "min_p must be in [0, 1]", "negative min_p", sampling=dict(min_p=-0.1)),
    row(by_session, ValueError, "min_p must be in [0, 1]", "min_p over 1", sampling=dict(min_p=1.5)),
    row(by_session, ValueError, "repetition_penalty must be in [0.1, 10]", "repetition_penalty 0",
        sampling=dict(repetition_penalty=0.0)),
    row(by_cli, SystemExit, "temperature must be a finite number", "NaN temperature argument",
        sampling=dict(temperature=NAN)),
    row(by_cli, SystemExit, "cfg_weight must be a finite number", "infinite cfg_weight argument",
        sampling=dict(cfg_weight=-INF)),

    row(by_session, ValueError, "must be a positive integer, got 0", "zero tokens", max_new_tokens=0),
    row(by_session, ValueError, "must be a positive integer, got -5", "negative tokens", max_new_tokens=-5),
    row(by_session, ValueError, "must be a positive integer, got 2.5", "fractional tokens", max_new_tokens=2.5),
    row(by_session, ValueError, "must be a positive integer, got True", "boolean tokens", max_new_tokens=True),
    row(by_session, ValueError, f"over this session's limit of {SESSION_TOKENS}", "tokens over the session's limit",
        max_new_tokens=SESSION_TOKENS + 1),
    row(by_session, ValueError, f"over T3's limit of {MAX_NEW_TOKENS}", "tokens over T3's limit",
        max_new_tokens=MAX_NEW_TOKENS + 1),
    row(by_cli, SystemExit, "must be a positive integer, got -5", "negative tokens argument", max_new_tokens=-5),
    row(by_cli, SystemExit, f"over T3's limit of {MAX_NEW_TOKENS}", "tokens over T3's limit argument",
        max_new_tokens=10 * MAX_NEW_TOKENS),

    row(by_session, FileExistsError, "exists; pass overwrite=True", "output exists", out=existing_file),
    row(by_session, FileNotFoundError, "is not an existing directory", "output in a missing directory",
        out=in_missing_directory),
    row(by_session, IsADirectoryError, "is a directory", "output is a directory", out=a_directory),
    row(by_cli, SystemExit, "(CLI: --overwrite)", "output exists, no --overwrite", out=existing_file),

    row(by_cli, SystemExit, "does not exist", "checkpoint directory missing", checkpoint=nowhere),
    row(by_cli, SystemExit, "missing s3gen.safetensors, tokenizer.json; empty t3_cfg.safetensors",
        "checkpoint files missing or empty", checkpoint=incomplete),
    row(by_cli, SystemExit, "t3_cfg.safetensors is not a readable safetensors file", "checkpoint file truncated",
        checkpoint=replacing("t3_cfg.safetensors", truncated_t3)),
    row(by_cli, SystemExit, "do not fit the tiny Chatterbox architecture", "checkpoint tensor of the wrong shape",
        checkpoint=replacing("t3_cfg.safetensors", half_width_text_embedding)),
    row(by_cli, SystemExit, "conds.pt is not a plain tensor file", "conds.pt not plain tensors",
        checkpoint=replacing("conds.pt", conds_with_a_pickled_class)),
    row(by_cli, SystemExit, "tokenizer.json is not a readable tokenizer file", "tokenizer.json corrupt",
        checkpoint=replacing("tokenizer.json", unreadable_tokenizer)),
    row(by_cli, SystemExit, "tokenizer.json lacks the token(s) [STOP]", "tokenizer.json without the stop token",
        checkpoint=replacing("tokenizer.json", tokenizer_without_stop)),
]


def contents(directory):
    """Every path under `directory` with its bytes (None for a folder)."""
    return {p.relative_to(directory): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


@pytest.mark.parametrize("drive,request_,error,message", BAD_INPUTS)
def test_bad_input_is_refused_and_nothing_is_written(drive, request_, error, message, session, tiny_tts,
                                                     tmp_path, capsys):
    inputs, out_dir = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    request = dict(text="Hello there.", voice="alto", sampling={}, max_new_tokens=TOKENS, checkpoint="synthetic",
                   exaggeration=0.5, seed=None, out=new_file) | request_
    out = request.pop("out")(out_dir)
    if callable(request["voice"]):
        request["voice"] = request["voice"](inputs)
    if callable(request["checkpoint"]):
        request["checkpoint"] = request["checkpoint"](inputs, tiny_tts.checkpoint_dir)
    before, existed = contents(out_dir), out.exists()

    with pytest.raises(error, match=None if error is SystemExit else re.escape(message)) as raised:
        drive(session, out, **request)
    if error is SystemExit:
        assert raised.value.code == 2
        assert message in capsys.readouterr().err
    assert out.exists() == existed
    assert contents(out_dir) == before  # no temporary file left, an existing file unchanged


def assert_speech(out):
    """`out` is the only file in its directory, and it holds TOKENS tokens of 24 kHz speech."""
    assert list(out.parent.iterdir()) == [out]
    wav, sr = sf.read(out)
    assert sr == 24_000 and len(wav) == TOKENS * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("voice", [
    audio(np.repeat(np.interp(np.arange(3 * 44_100) / 44_100, _t, SPEECHY)[:, None], 2, axis=1), 44_100),
    audio(SPEECHY, SR, "voice.flac"),
], ids=["stereo 44.1 kHz WAV", "mono 16 kHz FLAC"])
def test_other_channel_counts_and_rates_are_converted(session, tmp_path, voice):
    (tmp_path / "out").mkdir()
    out = session.synthesize_to_file(tmp_path / "out" / "speech.wav", "Hi.", voice(tmp_path), max_new_tokens=TOKENS)
    assert_speech(out)


def test_long_voice_is_trimmed_with_a_warning(session, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.warns(UserWarning, match="is 15.0 s long; only its first 10 s are used"):
        out = session.synthesize_to_file(tmp_path / "out" / "speech.wav", "Hi.", audio(np.tile(SPEECHY, 5))(tmp_path),
                                         max_new_tokens=TOKENS)
    assert_speech(out)


def test_overwrite_replaces_the_file(session, tmp_path):
    out = existing_file(tmp_path)
    session.synthesize_to_file(out, "Hi.", overwrite=True, max_new_tokens=TOKENS)
    assert_speech(out)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    out = existing_file(tmp_path)
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Speech(wav=np.zeros(2400, np.float32), sample_rate=24_000, seconds={}).save(out, overwrite=True)
    assert contents(tmp_path) == {out.relative_to(tmp_path): b"an earlier take"}


def test_say_writes_speech(tmp_path, capsys):
    out = tmp_path / "speech.wav"
    assert main(["say", "Hello there.", "--out", str(out), "--voice", "tenor", "--preset", "tiny", "--device", "cpu",
                 f"--max-new-tokens={TOKENS}", "--seed=1"]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {out}\n")  # after upstream's loading messages
    assert_speech(out)


def test_a_bad_seed_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from chatterbox_lab.loading import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_tts", no_loading)
    with pytest.raises(SystemExit) as raised:
        main(["say", "Hi.", "--out", str(tmp_path / "speech.wav"), "--seed", str(2**64), "--device", "cpu"])
    assert raised.value.code == 2 and "seed must be an integer from 0 to 2**64 - 1" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_chunked_say_promptly_and_cleanly(tmp_path, signal_name):
    """SIGINT or SIGTERM in the middle of `say --chunk`: a short message, no traceback,
    no file and no temporary file left, within a few seconds of the signal."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    # Many chunks: the signal must land while they are spoken, well before the last one.
    text = " ".join(["A sentence of its own, long enough to make a chunk of its own here."] * 320)
    for sent in (getattr(signal, signal_name),):
        out = tmp_path / f"{sent.name}.wav"
        process = subprocess.Popen([sys.executable, "-m", "chatterbox_lab", "say", text, "--chunk", "--out", str(out),
                                    "--preset", "tiny", "--device", "cpu", "--max-new-tokens=64"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Signalled once its start-up bar shows all stages done (on a busy machine the imports
        # alone may take many seconds), and later, once the first request's one-off costs are
        # paid (in a fresh environment librosa's first calls compile): while the chunks are spoken.
        stderr_parts = []
        reader = threading.Thread(target=lambda: stderr_parts.extend(iter(lambda: process.stderr.read(1), "")))
        reader.start()
        deadline = time.monotonic() + 120
        while "3/3" not in "".join(stderr_parts) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(5)
        assert process.poll() is None, "".join(stderr_parts)
        signalled = time.monotonic()
        process.send_signal(sent)
        process.wait(timeout=60)
        reader.join()
        stderr = "".join(stderr_parts)
        # The longest stretch with no stop check is one voice preparation (upstream's speech tokenizer)
        # or one S3Gen pass: seconds, up to about ten on a loaded 2-core machine. Before stop checks
        # reached the decoder, the same signal took over a minute.
        assert time.monotonic() - signalled < 20
        assert process.returncode == 130, stderr
        assert "interrupted: stopped at the next stop check; nothing was written" in stderr
        assert "Traceback" not in stderr
        assert [p.name for p in tmp_path.iterdir()] == []
