"""The corpus job: bad lines, resume after a stop or a kill, shards under torchrun, the example file."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.serving.corpus import (MANIFEST, ManifestPart, Shard, parse_line, parse_object, read_manifest,
                                           run_corpus)
from chatterbox_lab.serving.session import TTSSession

TOKENS = 4
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "data" / "corpus" / "example.jsonl"
JOB = [sys.executable, "-m", "chatterbox_lab", "corpus"]
TINY = ["--preset", "tiny", "--device", "cpu", f"--max-new-tokens={TOKENS}", "--no-progress"]


@pytest.fixture(scope="module")
def session(tiny_tts):
    conds = tiny_tts.conds
    s = TTSSession(tts=tiny_tts, steps=("static_cache", "embed_cache"), max_new_tokens=16)
    yield s
    s.close()
    tiny_tts.conds = conds  # other tests expect the voice the fixture prepared


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def good_lines(n: int, first: int = 0) -> list:
    return [dict(id=f"line-{i:03d}", text=f"Sentence number {i} of the test corpus.", voice=("alto", "tenor")[i % 2])
            for i in range(first, first + n)]


def assert_whole(out: Path, rows: dict, ids, tokens: int = TOKENS) -> None:
    """Every id has one ok row and a whole WAV of the length the row says; nothing else is in `out`."""
    for line_id in ids:
        assert rows[line_id]["status"] == "ok", rows[line_id]
        audio, rate = sf.read(out / f"{line_id}.wav")
        assert len(audio) == tokens * SAMPLES_PER_TOKEN and abs(len(audio) / rate - rows[line_id]["audio_s"]) < 1e-3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_the_launcher_environment_picks_the_shard():
    assert Shard.from_environment({}) == Shard(0, 1, 0)
    shard = Shard.from_environment(dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1"))
    assert [i for i in range(10) if shard.owns(i)] == [3, 7] and shard.manifest_name == "manifest.rank3.jsonl"
    assert shard.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="RANK 4 is not in 0..WORLD_SIZE-1"):
        Shard.from_environment(dict(RANK="4", WORLD_SIZE="4"))
    with pytest.raises(ValueError, match="start the job with torchrun"):
        Shard.from_environment(dict(WORLD_SIZE="2"))


def test_lines_of_any_sampling_values_batch_together_and_few_leftovers_run_alone():
    from chatterbox_lab.pipeline.voices import Reference
    from chatterbox_lab.sampling import SamplingParams
    from chatterbox_lab.serving.corpus import CorpusLine, _batches

    def line(i, seed=None, **sampling):
        return CorpusLine(i, f"id{i}", "x" * (40 - i), Reference(None, "v"), SamplingParams(**sampling), seed,
                          "original")

    todo = [line(i) for i in range(35)] + [line(35, temperature=0.5), line(36, seed=1)]
    batches = [[one.index for one in work] for work in _batches(todo, batch=32)]
    assert batches[0] == [35, *range(34, 3, -1)]  # sorted by length, shortest first, each with its own values
    assert batches[1:] == [[3, 2, 1, 0], [36]]  # 4 lines are 1/8 of a batch: still batched; the seeded alone
    todo = [line(i) for i in range(35)]
    assert [[one.index for one in work] for work in _batches(todo, batch=32)][1:] == [[2], [1], [0]]


def test_manifest_parts_merge_and_a_torn_row_is_skipped(tmp_path):
    part = ManifestPart(tmp_path / "manifest.rank0.jsonl")
    part.append("a", 1, "error", "no voice")
    part.append("a", 1, "ok", audio_s=1.0, path="a.wav")
    part.close()
    (tmp_path / "manifest.rank1.jsonl").write_text('{"id": "b", "line": 2, "status": "ok"}\n{"id": "c", "li')
    part = ManifestPart(tmp_path / "manifest.rank1.jsonl")  # a kill tore its last row: the next starts anew
    part.append("c", 3, "error", "bad")
    part.append(None, 4, "error", "not valid JSON")
    part.close()
    rows = read_manifest(tmp_path)
    assert {key: row["status"] for key, row in rows.items()} == {"a": "ok", "b": "ok", "c": "error",
                                                                 ("line", 4): "error"}


BAD_LINES = [
    ("not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    (dict(text="No id.", voice="alto"), "no 'id'"),
    (dict(id="../escape", text="Hi.", voice="alto"), "names the WAV file in the output folder"),
    (dict(id=".hidden", text="Hi.", voice="alto"), "starting with a letter or digit"),
    (dict(id="line-000", text="Again.", voice="alto"), "duplicate id 'line-000': line 1 already uses it"),
    (dict(id="no-text", voice="alto"), "no 'text'"),
    (dict(id="empty", text="  ", voice="alto"), "text is empty"),
    (dict(id="long", text="x" * 601, voice="alto"), "over the limit of 600"),
    (dict(id="script", text="中文", voice="alto"), "cannot represent"),
    (dict(id="voice", text="Hi.", voice="nobody.wav"), "not found; bundled voices: alto, tenor"),
    (dict(id="typo", text="Hi.", voice="alto", temprature=0.5), "unknown field(s) 'temprature'"),
    (dict(id="range", text="Hi.", voice="alto", top_p=0), "top_p must be in (0, 1]"),
    (dict(id="nan", text="Hi.", voice="alto", temperature="hot"), "temperature must be a finite number"),
    (dict(id="seed", text="Hi.", voice="alto", seed=-1), "seed must be an integer"),
    (dict(id="model", text="Hi.", voice="alto", model="turbo"), "model 'turbo' is not known; known models: original"),
]


def test_bad_lines_are_reported_and_the_job_goes_on(session, tmp_path):
    lines = good_lines(1) + [line for line, _ in BAD_LINES] + ["", dict(good_lines(1, first=1)[0], seed=7)]
    texts = write_lines(tmp_path / "texts.jsonl", lines)
    summary = run_corpus(texts, tmp_path / "out", batch=2, max_new_tokens=TOKENS, session=session, progress=False)
    assert (summary.lines, summary.written, summary.failed) == (len(lines) - 1, 2, len(BAD_LINES))
    rows = read_manifest(tmp_path / "out")
    for number, (_, reason) in enumerate(BAD_LINES, start=2):
        row = next(row for row in rows.values() if row["line"] == number)
        assert row["status"] == "error" and reason in row["reason"], (number, row)
    assert rows[("line", 7)]["id"] is None  # the duplicate's row does not hide the first line's
    assert_whole(tmp_path / "out", rows, ["line-000", "line-001"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line-000.wav", "line-001.wav", MANIFEST]

    again = run_corpus(texts, tmp_path / "out", batch=2, max_new_tokens=TOKENS, session=session, progress=False)
    assert (again.written, again.skipped, again.failed) == (0, 2, len(BAD_LINES))


def test_a_seeded_line_sounds_the_same_whatever_its_neighbours(session, tmp_path):
    seeded = dict(id="seeded", text="The same words, the same seed.", voice="tenor", seed=11, temperature=0.7)
    for name, lines in (("alone", [seeded]), ("among", good_lines(3) + [seeded])):
        run_corpus(write_lines(tmp_path / f"{name}.jsonl", lines), tmp_path / name, batch=2, max_new_tokens=TOKENS,
                   session=session, progress=False)
    assert (tmp_path / "alone" / "seeded.wav").read_bytes() == (tmp_path / "among" / "seeded.wav").read_bytes()


def test_a_session_batch_reuses_its_prepared_voices(session):
    session.synthesize_many(["One.", "Two."], ["alto", "tenor"], max_new_tokens=TOKENS, streams=2)
    prepared = session.voices.prepared_count
    speeches = session.synthesize_many(["Three.", "Four.", "Five."], ["tenor", "alto", "alto"],
                                       max_new_tokens=TOKENS, streams=2)
    assert session.voices.prepared_count == prepared
    assert [len(s.wav) for s in speeches] == [TOKENS * SAMPLES_PER_TOKEN] * 3


def test_a_session_batch_takes_one_set_of_sampling_values_per_text(session):
    from chatterbox_lab.sampling import SamplingParams

    values = [SamplingParams(temperature=0.6), SamplingParams(top_p=0.9)]
    speeches = session.synthesize_many(["One.", "Two."], ["alto", "tenor"], sampling=values, max_new_tokens=TOKENS)
    assert [len(s.wav) for s in speeches] == [TOKENS * SAMPLES_PER_TOKEN] * 2
    with pytest.raises(ValueError, match="one per text: 2 texts, 1 sets"):
        session.submit_many(["One.", "Two."], ["alto", "tenor"], sampling=values[:1])
    with pytest.raises(TypeError, match="must be a SamplingParams"):
        session.submit_many(["One.", "Two."], ["alto", "tenor"], sampling=[values[0], 0.5])


def test_an_interrupted_job_keeps_its_finished_lines_and_leaves_no_temporary_file(session, tmp_path, monkeypatch):
    """Ctrl-C (SIGTERM reaches the job as the same KeyboardInterrupt) while the second batch's first
    WAV is being written; then a WAV that a kill left without its row; then the rest."""
    lines = good_lines(6)
    texts, out = write_lines(tmp_path / "texts.jsonl", lines), tmp_path / "out"
    sync, temporaries = os.fsync, []

    def interrupted_on_the_third_temporary(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            temporaries.append(fd)
            if len(temporaries) == 3:
                raise KeyboardInterrupt
        sync(fd)

    monkeypatch.setattr(os, "fsync", interrupted_on_the_third_temporary)
    with pytest.raises(KeyboardInterrupt):
        run_corpus(texts, out, batch=2, max_new_tokens=TOKENS, session=session, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["line-000.wav", "line-001.wav", MANIFEST]
    (out / "line-005.wav").write_bytes((out / "line-000.wav").read_bytes())  # renamed, then killed before its row
    summary = run_corpus(texts, out, batch=2, max_new_tokens=TOKENS, session=session, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (3, 3, 0)
    rows = read_manifest(out)
    assert sorted(rows) == [line["id"] for line in lines] and rows["line-005"]["line"] == 6
    assert_whole(out, rows, rows)


def test_a_killed_job_resumes_where_it_left_off(session, tmp_path):
    """SIGKILL once a batch is done, in a process of its own; a rerun finishes the rest and removes
    the temporary file a kill can leave. Every id ends with one ok row and one whole WAV."""
    lines = good_lines(10)
    texts, out = write_lines(tmp_path / "texts.jsonl", lines), tmp_path / "out"
    process = subprocess.Popen(JOB + [str(texts), "--out", str(out), "--batch", "2", *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # the model loads first: tens of seconds on a busy 2-core machine
    while not (out.is_dir() and any(row["status"] == "ok" for row in read_manifest(out).values())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.kill()
    process.communicate()
    (out / ".line-009.wav.0123abcd.tmp").write_bytes(b"RIFF, cut short")
    summary = run_corpus(texts, out, batch=2, max_new_tokens=TOKENS, session=session, progress=False)
    assert summary.skipped >= 2 and summary.written + summary.skipped == len(lines)
    rows = read_manifest(out)
    assert sorted(rows) == [line["id"] for line in lines]
    assert_whole(out, rows, rows)


def test_torchrun_shards_the_lines_by_rank(tmp_path):
    lines = good_lines(5) + ["not json"]
    texts = write_lines(tmp_path / "texts.jsonl", lines)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "chatterbox_lab", "corpus", str(texts), "--out", str(out), "--batch", "2",
                               *TINY], capture_output=True, text=True, timeout=180, env=env)
    assert finished.returncode == 0, finished.stderr  # a failed line never stops the other process
    for rank in (0, 1):
        part = [json.loads(raw) for raw in (out / f"manifest.rank{rank}.jsonl").read_text().splitlines()]
        assert sorted(row["line"] for row in part) == [n for n in range(1, 7) if (n - 1) % 2 == rank]
    rows = read_manifest(out)
    assert rows[("line", 6)]["status"] == "error"
    assert_whole(out, rows, [line["id"] for line in lines[:5]])


def test_the_example_corpus_is_generated_and_every_line_is_good(session):
    made = subprocess.run([sys.executable, "scripts/make_corpus_example.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    raw_lines = EXAMPLE.read_text().splitlines()
    voices = {}
    lines = [parse_line(i, parse_object(raw), check_text=session.check_text, voices=voices, base=EXAMPLE.parent)
             for i, raw in enumerate(raw_lines)]
    assert len(lines) >= 500 and len({line.id for line in lines}) == len(lines)
    assert set(voices) == {"alto", "tenor"}
    assert len({line.sampling for line in lines}) > 1 and any(line.seed is not None for line in lines)
    lengths = sorted(len(line.text) for line in lines)
    assert lengths[0] < 40 and lengths[-1] > 300


@pytest.mark.gpu
def test_the_job_speaks_every_line_on_the_gpu_with_the_recommended_steps(tmp_path):
    """The full model with every recommended step of T3 and S3Gen: batches of the session's batched
    decoder, a last batch topped up, and a seeded line alone."""
    tokens = 32
    lines = good_lines(7) + [dict(good_lines(1, first=7)[0], seed=5, temperature=0.7)]
    texts, out = write_lines(tmp_path / "texts.jsonl", lines), tmp_path / "out"
    session = TTSSession(device="cuda", max_new_tokens=tokens)
    try:
        summary = run_corpus(texts, out, batch=4, max_new_tokens=tokens, session=session, progress=False)
    finally:
        session.close()
    assert (summary.written, summary.failed) == (len(lines), 0)
    rows = read_manifest(out)
    assert_whole(out, rows, [line["id"] for line in lines], tokens)
