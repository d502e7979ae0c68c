"""A serving session: one model, one compiled decoder, a bounded cache of prepared voices.

The decoder's captured step, its KV cache and upstream's `tts.conds` are shared,
mutable state, so requests run one at a time: concurrent callers queue instead
of corrupting each other's graphs or voices. Requests run on one dedicated worker
thread, not merely under a lock, because torch.compile's CUDA-graph trees keep
per-thread state: a step captured on one thread and replayed from a server's
pool of threads is not supported (pytorch/pytorch#123177). Each result is a
fresh host copy, never a view of a buffer the next request overwrites. With
`batch_requests`, the requests waiting when the worker frees up run as one batch.
"""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatterbox_lab import registry
from chatterbox_lab.decode.decoder import T3Decoder, sync_device
from chatterbox_lab.decode.plan import device_kind
from chatterbox_lab.kernels.picks import KernelPicks, shipped_for
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import (STAGES, Cancelled, synthesize, synthesize_long, synthesize_many,
                                               timed_stage)
from chatterbox_lab.pipeline.voices import (REFERENCE_RATE, Reference, VoiceCache, bundled_voices, read_reference,
                                            voice_path)
from chatterbox_lab.decode.turbo import TurboDecoder
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams
from chatterbox_lab.validation import (MAX_LONG_TEXT_CHARS, MAX_TEXT_CHARS, check_language, check_model,
                                       check_number, check_output_path, check_representable, check_seed,
                                       check_text, check_token_count, check_turbo_sampling, check_turbo_voice,
                                       check_voice_id)

# Registered voices live in memory (the used seconds: under 1 MB each); this bounds them.
MAX_REGISTERED_VOICES = 32
# Requests decoded together at most: each batch size keeps a decoder with its own KV cache.
MAX_BATCH_REQUESTS = 64


class VoiceLimitReached(Exception):
    """Registering one more voice would pass the session's bound."""


def import_cudagraph_trees() -> None:
    """Import torch's CUDA-graph trees on the calling thread (see `own_cudagraph_state`)."""
    import torch._inductor.cudagraph_trees  # noqa: F401


def own_cudagraph_state() -> None:
    """Give the calling thread its own CUDA-graph-tree state (run once on the worker).

    torch 2.11's trees find their state only on the thread that imported them
    (or threads autograd spawned) and fail an assertion anywhere else, e.g. on a
    worker started after another thread already compiled; torch 2.13 creates
    the state per thread itself. This does the same on older versions.

    The state goes into the thread's Python `threading.local` only. torch's own
    set-up, run by the thread that first imports the trees, also stashes it in
    C++ thread-local storage, for autograd's threads. That copy is released by
    the thread's C++ exit handlers, which need the GIL. When a worker ends while
    the interpreter shuts down, they cannot take it, and the process aborts
    ("terminate called without an active exception"). So the session imports
    the trees on its own thread (`import_cudagraph_trees`), never on the worker;
    and only when its decoder uses them (Inductor's graphs: about a second of imports).
    """
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)


@dataclass
class Speech:
    wav: np.ndarray
    sample_rate: int
    seconds: dict

    def wav_bytes(self) -> bytes:
        """16-bit PCM WAV."""
        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, self.wav, self.sample_rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()

    def save(self, path, overwrite: bool = False) -> Path:
        """Write `wav_bytes()` to `path` atomically: readers never see half a file, and a
        failed write leaves nothing behind (nor touches a file it was to replace)."""
        path = check_output_path(path, overwrite)
        data = self.wav_bytes()
        # Beside the destination, so the rename stays on one file system; "x" so a name
        # clash never clobbers another file; not tempfile, whose files are private (0600).
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        file = open(temp, "xb")
        try:
            with file:
                file.write(data)
                file.flush()
                # On disk before the rename, so a crash cannot leave an empty file under `path`.
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return path


class StageBar:
    """Named start-up stages: each one's wall seconds (device work included) go into `seconds`,
    and a progress bar ticks once per stage, naming the one running, so a long compile reads as
    progress and not as a hang. Stages are timed by `stage` blocks, or `begin` marks each start
    of stages timed elsewhere (the pipeline's, which `end` then records)."""

    def __init__(self, what: str, names: tuple, seconds: dict, progress: bool):
        from tqdm.auto import tqdm

        self.what, self.seconds, self.running = what, seconds, None
        self.bar = tqdm(total=len(names), desc=what, unit="stage", disable=not progress)

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.set_description(self.what)
        self.bar.close()

    def begin(self, name: str) -> None:
        if self.running is not None:
            self.bar.update()
        self.running = name
        self.bar.set_description(f"{self.what}: {name}")

    def end(self, seconds: dict) -> None:
        self.seconds.update(seconds)
        self.bar.update()
        self.running = None

    @contextlib.contextmanager
    def stage(self, name: str, device=None):
        self.begin(name)
        start = time.perf_counter()
        yield
        if device is not None:
            sync_device(device)
        self.end({name: time.perf_counter() - start})


class TTSSession:
    """`steps`: T3's steps (`registry.T3_STEPS`), or a preset's name (`registry.PRESETS`).
    `s3gen_steps`: S3Gen's (`registry.S3GEN_STEPS`) or a preset's name, applied to the session's
    model in place. Both default to `recommended`: the fastest set measured for this kind of device.
    `picks`: the kernels' configurations; by default those shipped for this card model
    (`kernels.picks.shipped_for`), else the kernels' defaults. With `flow_graphs`, the first request
    whose length falls in a new bucket captures its graph (tens of milliseconds on a GPU), once.
    `model`: "original", "turbo" or "multilingual" (`validation.TTS_MODELS`). Turbo's steps are the
    registry's Turbo ladder (`registry.TURBO_STEPS`) and its requests take `TurboSamplingParams`;
    multilingual requests name their `language`.

    `batch_requests`: how many waiting requests T3 may decode together (the original model). When
    the worker frees up, it takes every request waiting, up to this many, and decodes them as one
    batch, each with its own text, voice, sampling values and length. A request with a seed, or
    with `chunk`, runs alone: a seed's tokens must not depend on which requests came with it. Each
    batch size in use (powers of two up to it) gets its own decoder and KV cache, captured by
    `warmup`: their caches add up to under twice `batch_requests` utterances' caches. 1 (the
    default) serves one request at a time; it may be changed between requests."""

    def __init__(self, source="synthetic", *, model: str = "original", preset=None, device=None, steps="recommended",
                 s3gen_steps="recommended", picks: KernelPicks | None = None, max_new_tokens: int = 1000,
                 voices: int = 8, max_registered_voices: int = MAX_REGISTERED_VOICES, batch_requests: int = 1,
                 tts=None, progress: bool = False):
        from chatterbox_lab.s3gen.s3gen_steps import apply_s3gen_steps

        self.model = check_model(model)
        self.max_new_tokens = check_token_count(max_new_tokens)
        check_batch_requests(batch_requests, model)  # a cheap check, before the model loads
        # Seconds per start-up stage, these three and then the warm-up's (`warmup`).
        self.startup_s: dict[str, float] = {}
        with StageBar("start-up", ("load", "s3gen_steps", "t3_decoder"), self.startup_s, progress) as stages:
            with stages.stage("load"):
                self.tts = tts if tts is not None else load_tts(source, model=model, preset=preset, device=device)
            kind = device_kind(self.tts.device)
            ladder = "turbo" if model == "turbo" else "t3"
            if isinstance(steps, str):
                steps = registry.preset(steps, kind, model=ladder)
            if isinstance(s3gen_steps, str):
                s3gen_steps = registry.preset(s3gen_steps, kind, model="s3gen")
            with stages.stage("s3gen_steps", self.tts.device):
                apply_s3gen_steps(self.tts, s3gen_steps)
            if picks is None and kind != "cpu":
                picks = shipped_for(torch.cuda.get_device_name(self.tts.device))
            with stages.stage("t3_decoder", self.tts.device):
                if model == "turbo":
                    self.decoder = TurboDecoder(self.tts.t3, steps, max_new_tokens=max_new_tokens,
                                                max_text_tokens=MAX_TEXT_CHARS)
                else:
                    self.decoder = T3Decoder(self.tts.t3, steps, max_new_tokens=max_new_tokens,
                                             max_text_tokens=MAX_TEXT_CHARS, picks=picks)
        self.voices = VoiceCache(self.tts, capacity=voices)
        self.max_registered_voices = max_registered_voices
        self._named: dict[str, Reference] = {}
        # Only a step compiled by Inductor with its CUDA graphs needs the trees; our own captures do not.
        self._graph_trees = self.decoder.plan.graph == "inductor"
        if self._graph_trees:
            import_cudagraph_trees()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatterbox_lab-model",
                                          initializer=self._start_worker)
        # The decoder of the last batch size asked for (`submit_many`): its KV cache and captured
        # step are sized for that many utterances, so only one such decoder is kept at a time.
        self._batch_decoder: T3Decoder | None = None
        # Requests that may be decoded together, and a decoder for each batch size in use.
        self._waiting: deque[_Waiting] = deque()
        self._waiting_lock = threading.Lock()
        self._request_decoders: dict[int, T3Decoder] = {}
        self.batches_served: Counter[int] = Counter()  # batch size -> how many batches
        self.warmup_s: float | None = None
        self.batch_requests = batch_requests  # and against the decoder's steps

    @property
    def batch_requests(self) -> int:
        return self._batch_requests

    @batch_requests.setter
    def batch_requests(self, value: int) -> None:
        value = check_batch_requests(value, self.model)
        if value > 1 and not (self.decoder.plan.cache == "static" and self.decoder.plan.embedding == "cached"):
            raise ValueError("batch_requests > 1 decodes several utterances at once, which needs the static_cache "
                             "and embed_cache steps: add them, or serve one request at a time (batch_requests=1)")
        self._batch_requests = value

    def _start_worker(self) -> None:
        if self._graph_trees:
            own_cudagraph_state()
        # A new thread's current device is cuda:0, and Triton kernels and graph captures run on the
        # current device: a model on another card (cuda:LOCAL_RANK under torchrun) needs its own.
        device = torch.device(self.tts.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)

    def register_voice(self, voice_id: str, audio) -> str:
        """Name a reference recording (a path, a bundled name or a `Reference`), checked and
        prepared now, so that its conditioning cost is paid here and not by its first request.

        Its used seconds are kept in memory, so the file may go afterwards. All or nothing: a
        recording that fails its checks leaves the voice already under `voice_id`, if any, as
        it was. The swap happens on the worker, so registrations, deletions and requests
        never interleave. Bundled names are read-only."""
        voice_id = self.check_writable_voice_id(voice_id)
        reference = read_reference(audio, label=f"the recording for voice {voice_id!r}")
        return self._worker.submit(self._register, voice_id, reference).result()

    def _register(self, voice_id: str, reference: Reference) -> str:
        if voice_id not in self._named and len(self._named) >= self.max_registered_voices:
            raise VoiceLimitReached(f"{len(self._named)} voices are registered, the limit: delete one first "
                                    f"(DELETE /voices/{{id}}) or reuse an id")
        self.voices.use(reference)
        self._named[voice_id] = reference
        return voice_id

    def delete_voice(self, voice_id: str) -> None:
        """Forget a registered voice; requests already queued with it still get it."""
        voice_id = self.check_writable_voice_id(voice_id)
        if self._worker.submit(self._named.pop, voice_id, None).result() is None:
            raise LookupError(f"voice {voice_id!r} is not registered")

    @staticmethod
    def check_writable_voice_id(voice_id) -> str:
        """`voice_id`, refused unless it may name a registered voice."""
        voice_id = check_voice_id(voice_id)
        if voice_id in bundled_voices():
            raise PermissionError(f"voice {voice_id!r} is bundled and read-only: choose another id")
        return voice_id

    def voice_names(self) -> list[str]:
        return sorted({*bundled_voices(), *self._named})

    def _resolve(self, voice) -> Reference | Path:
        if isinstance(voice, Reference):
            return voice
        return self._named.get(voice) or voice_path(voice)

    def named_voice(self, name) -> Reference | Path:
        """A registered or bundled voice by name, never a file path: what a remote caller may ask for.
        The error names the voices there are and nothing of the file system."""
        found = (self._named.get(name) or bundled_voices().get(name)) if isinstance(name, str) else None
        if found is None:
            raise LookupError(f"voice {str(name)[:64]!r} not found; voices: {', '.join(self.voice_names())} "
                              f"(register one with PUT /voices/{{id}})")
        return found

    def warmup(self, voice="alto", progress: bool = True) -> float:
        """Run one short request now, so that the decoder's captures and S3Gen's compiles are paid
        here and not by the first caller; returns its seconds. Its stages (the voice, then the
        pipeline's) join `startup_s`: on a first use each is mostly its capture or compile. With
        `batch_requests`, one batch of each size follows ("batches")."""
        names = ("voice", *STAGES, *(("batches",) if self.batch_requests > 1 else ()))
        with StageBar("warm-up", names, self.startup_s, progress) as stages:
            start = time.perf_counter()
            self._worker.submit(self._warm, voice, stages).result()
            self.warmup_s = time.perf_counter() - start
        return self.warmup_s

    def _warm(self, voice, stages: StageBar) -> None:
        with stages.stage("voice", self.tts.device):
            self.tts.conds = self.voices.use(self._resolve(voice))
        text, tokens = "Warming up the decoder.", min(32, self.max_new_tokens)
        result = synthesize(self.tts, text, decoder=self.decoder, max_new_tokens=tokens, on_stage=stages.begin,
                            language="en" if self.model == "multilingual" else None)
        stages.end(result.seconds)
        if self.batch_requests > 1:
            with stages.stage("batches", self.tts.device):
                for size in batch_sizes(self.batch_requests):
                    synthesize_many(self.tts, [text] * size, self._resolve(voice), decoder=self._request_decoder(size),
                                    max_new_tokens=tokens, voice_cache=self.voices)

    def submit(self, text, voice="alto", *, sampling: SamplingParams | TurboSamplingParams | None = None,
               max_new_tokens: int | None = None, exaggeration: float = 0.5, seed: int | None = None,
               chunk: bool = False, cancelled=None, language: str | None = None) -> Future:
        """Check a request here, in the caller's thread, then queue it on the worker; the
        future's result is its `Speech`. `chunk`: text of any length, spoken sentence chunk
        by sentence chunk (`pipeline.synthesize_long`); `max_new_tokens` then bounds each
        chunk. `cancelled`: a callable asked at each stop check (when the request reaches the
        worker, and between sentence chunks); once it answers True the request stops there
        with `pipeline.Cancelled`, freeing the worker for the next. `sampling`: None for the model's
        defaults. `language`: the multilingual model's language id (`validation.LANGUAGES`)."""
        text = self.check_text(text, chunk)
        n, sampling = self._check_decoding(max_new_tokens, sampling)
        language = check_language(self.model, language, self.tts.checkpoint_dir)
        exaggeration, seed = check_number("exaggeration", exaggeration), check_seed(seed)
        voice = self._resolve(voice)
        if self.model == "turbo":  # upstream asserts this deep in its preparation
            check_turbo_voice(len(read_reference(voice).samples) / REFERENCE_RATE)
        if self.batch_requests > 1 and not chunk and seed is None:
            waiting = _Waiting(text, voice, sampling, n, exaggeration, cancelled)
            # Queued before its job: a job that runs at once finds it waiting.
            with self._waiting_lock:
                self._waiting.append(waiting)
            self._worker.submit(self._run_waiting)
            return waiting.future
        return self._worker.submit(self._run, text, voice, sampling, n, exaggeration, seed, chunk, cancelled, language)

    def submit_many(self, texts: list, voices: list, *, sampling: SamplingParams | list = SamplingParams(),
                    max_new_tokens: int | None = None, streams: int | None = None, cancelled=None) -> Future:
        """Many utterances, with one set of sampling values or a list of one per text, checked as
        `submit` checks one, then queued on the worker as one request; the future's result is a
        `Speech` per text, in order, each with the stage times of all of them
        (`pipeline.synthesize_many`). T3 decodes `streams` of them at a time (default: all), with
        the session's steps, picks and voice cache."""
        if self.model != "original":
            raise ValueError(f"batched decoding runs the original model's decoder only; this session's model is "
                             f"{self.model}: submit the texts one by one")
        texts = [self.check_text(text) for text in texts]
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(texts):
                raise ValueError(f"give one set of sampling values for all texts or one per text: {len(texts)} "
                                 f"texts, {len(sampling)} sets")
            n = self._check_decoding(max_new_tokens, None)[0]
            sampling = [self._check_decoding(n, values)[1] for values in sampling]
        else:
            n, sampling = self._check_decoding(max_new_tokens, sampling)
        voices = [self._resolve(voice) for voice in voices]
        streams = streams or len(texts)
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams must be a positive integer, got {streams!r}")
        return self._worker.submit(self._run_many, texts, voices, sampling, n, streams, cancelled)

    def check_text(self, text, chunk: bool = False) -> str:
        """`text`, refused unless this session's model can speak it (`chunk`: any length)."""
        text = check_text(text, max_chars=MAX_LONG_TEXT_CHARS if chunk else MAX_TEXT_CHARS)
        # Turbo's byte-level tokenizer has a token for any text; the multilingual one prepares text
        # per language, so only the English model's characters are checked here.
        return check_representable(text, self.tts.tokenizer) if self.model == "original" else text

    def _check_decoding(self, max_new_tokens, sampling) -> tuple[int, SamplingParams]:
        n = check_token_count(max_new_tokens if max_new_tokens is not None else self.max_new_tokens)
        if n > self.max_new_tokens:
            raise ValueError(f"max_new_tokens {n} is over this session's limit of {self.max_new_tokens}: "
                             f"create the session with a larger max_new_tokens")
        if self.model == "turbo":
            if isinstance(sampling, SamplingParams):
                check_turbo_sampling(cfg_weight=sampling.cfg_weight, min_p=sampling.min_p)
            sampling = TurboSamplingParams() if sampling is None else sampling
            if not isinstance(sampling, TurboSamplingParams):
                raise TypeError(f"sampling must be a TurboSamplingParams for the turbo model, got "
                                f"{type(sampling).__name__}")
            return n, sampling
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        return n, sampling

    def synthesize(self, text, voice="alto", **options) -> Speech:
        """`submit` (same keywords) and wait for the speech. An interrupted wait (Ctrl-C)
        cancels the request, which stops at its next stop check."""
        return self._wait(self.submit, text, voice, **options)

    def synthesize_many(self, texts: list, voices: list, **options) -> list[Speech]:
        """`submit_many` (same keywords) and wait for the speeches; cancelled as `synthesize` is."""
        return self._wait(self.submit_many, texts, voices, **options)

    @staticmethod
    def _wait(submit, *args, **options):
        interrupted = threading.Event()
        asked = options.pop("cancelled", None)
        future = submit(*args, cancelled=lambda: interrupted.is_set() or bool(asked and asked()), **options)
        try:
            return future.result()
        except BaseException:
            interrupted.set()
            raise

    def synthesize_to_file(self, path, text, voice="alto", *, overwrite: bool = False, **options) -> Path:
        """`synthesize` (same keywords) into a 16-bit WAV file; returns its path.

        The destination is checked first, so a bad path costs no model time, and the
        file is written only once the speech exists (see `Speech.save`).
        """
        check_output_path(path, overwrite)
        return self.synthesize(text, voice, **options).save(path, overwrite)

    def _run(self, text, voice, sampling, n, exaggeration, seed, chunk, cancelled, language=None) -> Speech:
        """On the worker thread: every model call of the session happens here."""
        if cancelled is not None and cancelled():
            raise Cancelled("the caller gave up before the request started")
        with _out_of_memory_explained("use shorter text or fewer max_new_tokens"):
            # The voice is prepared here, not in `synthesize`: its time (none for a cached voice)
            # is the request's conditioning stage.
            conditioning = {}
            with timed_stage(self.tts.device, conditioning, "conditioning"):
                self.tts.conds = self.voices.use(voice, exaggeration)
            if seed is not None:
                torch.manual_seed(seed)
            options = dict(decoder=self.decoder, max_new_tokens=n, sampling=sampling, language=language)
            result = (synthesize_long(self.tts, text, cancelled=cancelled, **options) if chunk
                      else synthesize(self.tts, text, cancelled=cancelled, **options))
        return _speech(result, {**result.seconds, **conditioning})

    def _run_many(self, texts, voices, sampling, n, streams, cancelled) -> list[Speech]:
        """On the worker thread, as `_run`."""
        if cancelled is not None and cancelled():
            raise Cancelled("the caller gave up before the request started")
        with _out_of_memory_explained("use fewer streams, shorter text or fewer max_new_tokens"):
            if self._batch_decoder is None or self._batch_decoder.streams != streams:
                self._batch_decoder = None  # its memory is free before the next is built
                self._batch_decoder = T3Decoder(self.tts.t3, self.decoder.steps, max_new_tokens=self.max_new_tokens,
                                                max_text_tokens=MAX_TEXT_CHARS, streams=streams,
                                                picks=self.decoder.picks)
            result = synthesize_many(self.tts, texts, voices, decoder=self._batch_decoder, max_new_tokens=n,
                                     sampling=sampling, voice_cache=self.voices, cancelled=cancelled)
        return [_speech(speech, result.seconds) for speech in result.speeches]

    def _run_waiting(self) -> None:
        """On the worker: the oldest waiting requests, up to `batch_requests`, decoded together. Each
        request queues one of these jobs; a job that finds none waiting was served by an earlier one."""
        with self._waiting_lock:
            taken = [self._waiting.popleft() for _ in range(min(self.batch_requests, len(self._waiting)))]
        group = []
        for waiting in taken:
            if not waiting.future.set_running_or_notify_cancel():
                continue
            if waiting.gave_up():
                waiting.future.set_exception(Cancelled("the caller gave up before the request started"))
                continue
            group.append(waiting)
        if len(group) == 1:
            self._run_alone(group[0])
        elif group:
            self._run_together(group)

    def _run_alone(self, waiting: _Waiting) -> None:
        try:
            speech = self._run(waiting.text, waiting.voice, waiting.sampling, waiting.max_new_tokens,
                               waiting.exaggeration, None, False, waiting.cancelled)
        except Exception as exc:
            waiting.future.set_exception(exc)
        else:
            waiting.future.set_result(speech)

    def _run_together(self, group: list[_Waiting]) -> None:
        """Several requests as one batch: each voice is prepared on its own (a failure is that request's
        alone), then one `synthesize_many`. The batch stops early only once every caller has gone."""
        conditioning, ready = {}, []
        for waiting in group:
            seconds = {}
            try:
                with timed_stage(self.tts.device, seconds, "conditioning"):
                    # Read once: the batch below finds the prepared voice by this Reference's key.
                    waiting.voice = read_reference(waiting.voice)
                    self.voices.use(waiting.voice, waiting.exaggeration)
            except Exception as exc:
                waiting.future.set_exception(exc)
                continue
            conditioning[id(waiting)] = seconds
            ready.append(waiting)
        if len(ready) == 1:  # the others' voices failed
            self._run_alone(ready[0])
        if len(ready) <= 1:
            return
        size = next(size for size in batch_sizes(self.batch_requests) if size >= len(ready))
        try:
            with _out_of_memory_explained("send shorter text or fewer max_new_tokens, or lower batch_requests"):
                result = synthesize_many(
                    self.tts, [w.text for w in ready], [w.voice for w in ready],
                    decoder=self._request_decoder(size),
                    max_new_tokens=[w.max_new_tokens for w in ready], sampling=[w.sampling for w in ready],
                    exaggeration=[w.exaggeration for w in ready], voice_cache=self.voices,
                    cancelled=lambda: all(w.gave_up() for w in ready))
        except Exception as exc:  # every request of the batch learns why
            for waiting in ready:
                waiting.future.set_exception(exc)
            return
        self.batches_served[len(ready)] += 1
        for waiting, speech in zip(ready, result.speeches):
            if waiting.gave_up():
                waiting.future.set_exception(Cancelled("the caller gave up while its batch was decoded"))
            else:
                waiting.future.set_result(_speech(speech, {**result.seconds, **conditioning[id(waiting)]}))

    def _request_decoder(self, size: int) -> T3Decoder:
        """The decoder for batches of `size` requests, built on first use."""
        if size not in self._request_decoders:
            self._request_decoders[size] = T3Decoder(self.tts.t3, self.decoder.steps, streams=size,
                                                     max_new_tokens=self.max_new_tokens,
                                                     max_text_tokens=MAX_TEXT_CHARS, picks=self.decoder.picks)
        return self._request_decoders[size]

    def close(self) -> None:
        self._worker.shutdown(wait=True)


@dataclass(eq=False)
class _Waiting:
    """A request waiting to be decoded with others (`TTSSession.batch_requests`)."""
    text: str
    voice: Reference | Path
    sampling: SamplingParams
    max_new_tokens: int
    exaggeration: float
    cancelled: object  # a callable, or None
    future: Future = field(default_factory=Future)

    def gave_up(self) -> bool:
        return self.cancelled is not None and bool(self.cancelled())


def batch_sizes(batch_requests: int) -> list[int]:
    """The batch sizes a session with `batch_requests` decodes: powers of two from 2, and the bound."""
    sizes = [1 << i for i in range(1, batch_requests.bit_length()) if 1 << i < batch_requests]
    return [*sizes, batch_requests] if batch_requests > 1 else []


def check_batch_requests(value, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_REQUESTS:
        raise ValueError(f"batch_requests must be a whole number from 1 to {MAX_BATCH_REQUESTS}, got {value!r}")
    if value > 1 and model != "original":
        raise ValueError(f"batch_requests > 1 batches the original model's decoder only; the {model} model serves "
                         f"one request at a time (batch_requests=1)")
    return value


def _speech(result, seconds: dict) -> Speech:
    """A fresh host copy of a synthesis: never a view of a buffer the next request overwrites."""
    return Speech(wav=np.array(result.wav, dtype=np.float32, copy=True), sample_rate=result.sample_rate,
                  seconds=dict(seconds))


@contextlib.contextmanager
def _out_of_memory_explained(advice: str):
    """A GPU out-of-memory error as a `MemoryError` that says what to change, its cached blocks freed."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise MemoryError(
            f"the GPU ran out of memory for this request: {advice}, a smaller max_new_tokens for the session "
            f"(its KV cache is sized from it), or free memory held by other processes ({exc})") from None
