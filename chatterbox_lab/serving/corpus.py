"""The corpus job: a JSON-lines file of texts into one WAV file per line and a manifest.

`python -m chatterbox_lab corpus texts.jsonl --out DIR` reads one JSON object per line:
`id`, `text`, `voice` (a bundled name or an audio path, relative to the texts file), and
optionally the `SamplingParams` fields, a `seed` and a `model`. It writes `DIR/<id>.wav`
for each line and appends one manifest row per line: id, line number, status, reason,
seconds of audio and the WAV's name.

It is built to be stopped and started again:

- A WAV appears whole or not at all: it is written beside its destination and renamed
  (`Speech.save`). A WAV in DIR is a finished line, and a rerun skips it.
- The manifest is appended, flushed and synced per row, so a kill loses at most the rows of
  the batch in flight. A row torn by a kill is skipped when read.
- Ctrl-C or SIGTERM stop at the decoder's next stop check; no temporary file is left. A kill
  (SIGKILL) can leave one, which the next run of the same lines removes.

A bad line gets an error row naming what to change, and the job goes on. The checks are the
session's (`validation`), so a line is refused here exactly as a request would be.

Unseeded lines run in batches (`TTSSession.submit_many`), sorted by length so that a batch
pads little, each line with its own sampling values; a few leftover lines run alone. A line with
a `seed` runs alone, so its audio is what `say --seed` gives for it, whatever else the file holds.

Under `torchrun`, each process takes the lines whose index i (from 0, in file order) has
i % WORLD_SIZE == RANK, runs on `cuda:LOCAL_RANK`, and appends its own manifest part
(`manifest.rank<R>.jsonl`). Nothing else coordinates the processes; `read_manifest` merges
the parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import BrokenExecutor
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatterbox_lab.pipeline.voices import Reference, bundled_voices, read_reference
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.validation import check_seed, check_token_count

MANIFEST = "manifest.jsonl"
# The model families a line may name. Only upstream's original English model is known today; a
# family added later is one more entry here and one more case in `open_session`.
MODELS = ("original",)
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
FIELDS = ("id", "text", "voice", "seed", "model", *SAMPLING_FIELDS)
# Ids become file names in DIR: no separators, no leading dot (hidden files and "..").
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A cut of a model's lines with fewer lines than this share of a batch runs line by line (`_batches`).
SOLO_SHARE = 8
# `Speech.save`'s temporary name for DIR/<id>.wav.
TEMPORARY_PATTERN = re.compile(r"\.(?P<id>.+)\.wav\.[0-9a-f]{8}\.tmp")


class BadLine(ValueError):
    """A line the job cannot speak; its message says what to change."""


@dataclass(frozen=True)
class Shard:
    """This process's share of the lines: all of them, or under `torchrun` every WORLD_SIZE-th."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=os.environ) -> Shard:
        """The launcher's RANK, WORLD_SIZE and LOCAL_RANK; none set, one process with every line."""
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            shard = cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
        except (KeyError, ValueError):
            raise ValueError("WORLD_SIZE is set, but RANK or LOCAL_RANK is missing or not a whole number: "
                             "start the job with torchrun, or unset WORLD_SIZE") from None
        if not 0 <= shard.rank < shard.world_size or shard.local_rank < 0:
            raise ValueError(f"RANK {shard.rank} is not in 0..WORLD_SIZE-1 ({shard.world_size - 1}): "
                             f"start the job with torchrun")
        return shard

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.world_size == 1 else f"manifest.rank{self.rank}.jsonl"

    def device(self, asked: str | None) -> str | None:
        """`cuda:LOCAL_RANK` for 'cuda' or no choice where a GPU is present; otherwise `asked`."""
        if asked in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return asked


@dataclass(frozen=True)
class CorpusLine:
    index: int   # from 0, in file order: what the shards split
    id: str
    text: str
    voice: Reference
    sampling: SamplingParams
    seed: int | None
    model: str

    @property
    def number(self) -> int:
        """The line number an editor shows."""
        return self.index + 1


@dataclass
class CorpusSummary:
    lines: int         # this process's share of the file
    written: int       # WAVs written by this run
    skipped: int       # lines finished by an earlier run
    failed: int
    audio_s: float     # seconds of audio written by this run
    load_s: float      # model load and session set-up
    wall_s: float      # from the first line to the last, model load excluded
    manifest: Path

    @property
    def audio_s_per_s(self) -> float:
        """Seconds of audio written per second of wall time (the real-time multiple)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def check_model(model) -> str:
    if model not in MODELS:
        raise BadLine(f"model {str(model)[:40]!r} is not known; known models: {', '.join(MODELS)}")
    return model


def open_session(model: str, **options):
    """The session that speaks `model`'s lines (`TTSSession`'s keywords in `options`)."""
    from chatterbox_lab.serving.session import TTSSession

    check_model(model)
    return TTSSession(**options)


def check_id(line_id) -> str:
    if line_id is None:
        raise BadLine("no 'id': every line needs an id, a text and a voice")
    if not isinstance(line_id, str) or not ID_PATTERN.fullmatch(line_id):
        raise BadLine(f"id {str(line_id)[:40]!r} must be 1 to 128 ASCII letters, digits, '.', '-' or '_', "
                      f"starting with a letter or digit: it names the WAV file in the output folder")
    return line_id


def parse_object(raw: str) -> dict:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON ({exc.msg} at column {exc.colno}): write one JSON object per line") from None
    if not isinstance(item, dict):
        raise BadLine(f"a line must be a JSON object with id, text and voice, got a {type(item).__name__}")
    return item


def parse_line(index: int, item: dict, *, check_text, voices: dict, base: Path) -> CorpusLine:
    """One line's object, checked: `check_text` is the session's text check, `voices` caches each
    voice read (by the name or path as written), `base` is the folder relative voice paths start from."""
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise BadLine(f"unknown field(s) {', '.join(map(repr, unknown))}; a line's fields are {', '.join(FIELDS)}")
    for name in ("text", "voice"):
        if name not in item:
            raise BadLine(f"no {name!r}: every line needs an id, a text and a voice")
    try:
        text = check_text(item["text"])
        sampling = SamplingParams(**{name: item[name] for name in SAMPLING_FIELDS if name in item})
        seed = check_seed(item.get("seed"))
    except (ValueError, TypeError) as exc:
        raise BadLine(str(exc)) from None
    model = check_model(item.get("model", "original"))
    voice = item["voice"]
    if not isinstance(voice, str):
        raise BadLine(f"voice must be a bundled voice's name or an audio path, got {str(voice)[:40]!r}")
    if voice not in voices:  # a reference, or why it was refused: each voice is read once
        try:
            voices[voice] = read_reference(voice if voice in bundled_voices() else base / Path(voice).expanduser())
        except (ValueError, OSError) as exc:
            voices[voice] = str(exc)
    if isinstance(voices[voice], str):
        raise BadLine(voices[voice])
    return CorpusLine(index, item["id"], text, voices[voice], sampling, seed, model)


def read_manifest(out: Path) -> dict:
    """Every manifest part in `out` merged: the last row per id (per line number for a row without
    an id), a finished line's row before any other. Rows torn by a kill are skipped."""
    merged = {}
    for part in sorted(Path(out).glob("manifest*.jsonl")):
        for raw in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or "status" not in row:
                continue
            key = row.get("id") or ("line", row.get("line"))
            if merged.get(key, {}).get("status") != "ok" or row["status"] == "ok":
                merged[key] = row
    return merged


class ManifestPart:
    """This process's manifest file, appended one synced row at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a+", encoding="utf-8")
        self._file.seek(0, os.SEEK_END)
        if self._file.tell():
            self._file.seek(self._file.tell() - 1)
            if self._file.read(1) != "\n":  # a row torn by a kill: the next starts on its own line
                self._file.write("\n")

    def append(self, line_id: str | None, number: int, status: str, reason: str = "", audio_s: float = 0.0,
               path: str | None = None) -> None:
        row = dict(id=line_id, line=number, status=status, reason=reason, audio_s=round(audio_s, 3), path=path)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def check_job(texts, out, batch: int, max_new_tokens: int) -> tuple[Path, Path]:
    """The job's paths and sizes, refused before any model loads."""
    texts, out = Path(texts).expanduser(), Path(out).expanduser()
    if not texts.is_file():
        raise FileNotFoundError(f"{texts} is not a file: give a JSON-lines file, one object per line")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: give a folder for the WAVs and the manifest")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive whole number, got {batch!r}")
    check_token_count(max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    return texts, out


def run_corpus(texts, out, *, batch: int = 32, max_new_tokens: int = 1000, shard: Shard | None = None,
               progress: bool = True, session=None, **session_options) -> CorpusSummary:
    """The corpus job for this process's shard (by default from the launcher's environment).
    `session`: a `TTSSession` for the original model, else one is opened with `session_options`
    (`TTSSession`'s keywords; `device` goes to this shard's GPU) and closed at the end. No model
    loads when every line of the shard is finished or bad."""
    from tqdm.auto import tqdm

    texts, out = check_job(texts, out, batch, max_new_tokens)
    shard = shard or Shard.from_environment()
    raw_lines = texts.read_text(encoding="utf-8", errors="replace").splitlines()
    mine = [i for i, raw in enumerate(raw_lines) if shard.owns(i) and raw.strip()]
    manifest = ManifestPart(out / shard.manifest_name)
    summary = CorpusSummary(lines=len(mine), written=0, skipped=0, failed=0, audio_s=0.0, load_s=0.0, wall_s=0.0,
                            manifest=manifest.path)
    opened = None
    try:
        unfinished = _unfinished(raw_lines, mine, out, manifest, summary)
        if unfinished and session is None:
            start = time.perf_counter()
            session_options["device"] = shard.device(session_options.get("device"))
            device = torch.device(session_options["device"] or "cpu")
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # graphs and kernels launch on this rank's card
            session = opened = open_session("original", max_new_tokens=max_new_tokens, **session_options)
            summary.load_s = time.perf_counter() - start
        start = time.perf_counter()
        todo, voices = [], {}
        for index, item in unfinished:
            try:
                todo.append(parse_line(index, item, check_text=session.check_text, voices=voices, base=texts.parent))
            except BadLine as exc:
                _failed(manifest, summary, item["id"], index + 1, str(exc))
        with tqdm(total=len(todo), desc=f"corpus {shard.rank + 1}/{shard.world_size}" if shard.world_size > 1
                  else "corpus", unit="line", disable=not progress) as bar:
            for work in _batches(todo, batch):
                for line, outcome in _speak(session, work, batch, max_new_tokens):
                    if isinstance(outcome, str):
                        _failed(manifest, summary, line.id, line.number, outcome)
                    else:
                        audio_s = len(outcome.wav) / outcome.sample_rate
                        outcome.save(out / f"{line.id}.wav", overwrite=True)
                        manifest.append(line.id, line.number, "ok", audio_s=audio_s, path=f"{line.id}.wav")
                        summary.written += 1
                        summary.audio_s += audio_s
                    summary.wall_s = time.perf_counter() - start
                    bar.update()
                    bar.set_postfix_str(f"{summary.audio_s_per_s:.1f} audio s/s")
    finally:
        manifest.close()
        if opened is not None:
            opened.close()
    return summary


def _failed(manifest: ManifestPart, summary: CorpusSummary, line_id, number: int, reason: str) -> None:
    manifest.append(line_id, number, "error", reason)
    summary.failed += 1


def _unfinished(raw_lines, mine, out, manifest, summary) -> list[tuple[int, dict]]:
    """(index, object) of this shard's lines still to speak, ids checked; a line with a bad id gets
    its error row now. A WAV already in `out` is a finished line (a kill between its rename and its
    row leaves it without one, which is added here); a temporary file left by a kill is removed."""
    import soundfile as sf

    first_use = {}  # id -> index of the line that uses it first, over the whole file
    for index, raw in enumerate(raw_lines):
        # A bad line is skipped here; its error is reported by the shard that owns it.
        with contextlib.suppress(BadLine):
            if raw.strip():
                first_use.setdefault(check_id(parse_object(raw).get("id")), index)
    owned_indices = set(mine)
    owned = {line_id for line_id, index in first_use.items() if index in owned_indices}
    for temporary in out.iterdir():
        match = TEMPORARY_PATTERN.fullmatch(temporary.name)
        if match and match["id"] in owned:
            temporary.unlink(missing_ok=True)
    recorded = read_manifest(out)
    unfinished = []
    for index in mine:
        line_id = None
        try:
            item = parse_object(raw_lines[index])
            line_id = check_id(item.get("id"))
            if first_use[line_id] != index:
                raise BadLine(f"duplicate id {line_id!r}: line {first_use[line_id] + 1} already uses it")
        except BadLine as exc:
            # An id that cannot be used is kept only in the reason: the row's key is its line number.
            usable = line_id is not None and first_use.get(line_id) == index
            _failed(manifest, summary, line_id if usable else None, index + 1, str(exc))
            continue
        wav = out / f"{line_id}.wav"
        if wav.is_file():
            if recorded.get(line_id, {}).get("status") != "ok":
                manifest.append(line_id, index + 1, "ok", audio_s=sf.info(str(wav)).duration, path=wav.name)
            summary.skipped += 1
        else:
            unfinished.append((index, item))
    return unfinished


def _batches(todo: list, batch: int) -> list[list[CorpusLine]]:
    """Seeded lines one by one; the rest grouped by model, each group sorted by
    text length (a batch decodes until its longest line stops) and cut into batches. A cut with
    fewer than 1/SOLO_SHARE of a batch's lines runs line by line instead: a batch costs the same
    however few of its rows are real, and a lone line on the session's own decoder costs far less."""
    seeded = [[line] for line in todo if line.seed is not None]
    groups = {}
    for line in todo:
        if line.seed is None:
            groups.setdefault(line.model, []).append(line)
    batches = []
    for group in groups.values():
        group.sort(key=lambda line: len(line.text))
        for start in range(0, len(group), batch):
            cut = group[start:start + batch]
            batches += [cut] if len(cut) * SOLO_SHARE >= batch else [[line] for line in cut]
    return batches + seeded


def _speak(session, work: list, batch: int, max_new_tokens: int) -> list:
    """(line, its `Speech` or the reason it failed) for one batch, or one line alone. A failure is
    every one of the batch's lines' reason, and the job goes on."""
    try:
        if len(work) == 1:
            line = work[0]
            speeches = [session.synthesize(line.text, line.voice, sampling=line.sampling,
                                           max_new_tokens=max_new_tokens, seed=line.seed)]
        else:
            speeches = session.synthesize_many([line.text for line in work], [line.voice for line in work],
                                               sampling=[line.sampling for line in work],
                                               max_new_tokens=max_new_tokens,
                                               streams=batch)
    except BrokenExecutor:
        raise  # the session cannot run anything: every line after would fail the same way
    except (ValueError, RuntimeError, MemoryError) as exc:
        return [(line, f"{type(exc).__name__}: {exc}") for line in work]
    return list(zip(work, speeches))
