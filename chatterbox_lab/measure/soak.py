"""A bounded soak of the HTTP example: concurrent clients, varied requests, loopback only.

After warm-up it checks what a service copying this session needs to hold:
no errors, no recompiles, every response a WAV of the expected length, and
resident memory that stays flat once the first requests have filled the
per-shape caches (sampled every 50 requests).
"""
from __future__ import annotations

import io
import math
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from chatterbox_lab.decode.compiled_step import compile_counters
from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN

# Speech tokens per request, drawn from this range (inclusive).
TOKENS = (4, 12)
TEXTS = ["Short.", "A sentence of middling length, with a comma.", "Numbers like 42 and 7 read aloud.",
         "Questions end differently, don't they?", "Exclamations too!"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class LoopbackServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread, for tests and soaks."""

    def __init__(self, app, port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_soak(url: str, voices: list[str], requests: int = 500, clients: int = 4, tokens=TOKENS,
             seed: int = 0, time_limit_s: float = 600, progress: bool = True, gpu: bool = False,
             seeded: bool = True) -> dict:
    """`gpu`: the server runs in this process on a GPU, whose allocated memory is then sampled with
    the host's. `seeded`: each request sends a seed of its own; a seeded request is never batched
    with others (`TTSSession.batch_requests`)."""
    import httpx
    import soundfile as sf
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    jobs = [dict(text=rng.choice(TEXTS), voice=rng.choice(voices), max_new_tokens=rng.randint(*tokens),
                 temperature=rng.choice([0.5, 0.8, 1.1]), cfg_weight=rng.choice([0.0, 0.3, 0.5]),
                 top_p=rng.choice([0.8, 0.95, 1.0]), min_p=rng.choice([0.02, 0.05, 0.1]),
                 repetition_penalty=rng.choice([1.0, 1.2, 1.5]), **({"seed": i} if seeded else {}))
            for i in range(requests)]
    deadline = time.monotonic() + time_limit_s
    errors, latencies, bad_lengths, rss_trace, gpu_trace, audio_s = [], [], [], [], [], []
    not_started = []
    done = iter(range(1, requests + 1))
    counting = threading.Lock()
    before = compile_counters()
    rss_start = rss_mib()

    def call(job):
        if time.monotonic() > deadline:
            not_started.append(job)
            return
        start = time.perf_counter()
        try:
            with httpx.Client(timeout=120) as client:
                response = client.post(f"{url}/synthesize", json=job)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            else:
                wav, sr = sf.read(io.BytesIO(response.content))
                audio_s.append(len(wav) / sr)
                if sr != 24000 or len(wav) != job["max_new_tokens"] * SAMPLES_PER_TOKEN:
                    bad_lengths.append((job["max_new_tokens"], len(wav)))
        except Exception as exc:  # a soak records failures instead of stopping at the first
            errors.append(repr(exc))
        # Memory is sampled every 50 requests sent, failed ones included.
        with counting:
            n = next(done)
            if n % 50 == 0:
                rss_trace.append((n, round(rss_mib(), 1)))
                if gpu:
                    gpu_trace.append((n, round(torch.cuda.memory_allocated() / 2**20, 1)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool, tqdm(total=requests, desc="soak", unit="request",
                                                   disable=not progress) as bar:
        for _ in pool.map(call, jobs):
            bar.update()
    wall = time.perf_counter() - start
    after = compile_counters()
    latencies.sort()
    completed = len(latencies)
    return dict(requests=requests, clients=clients, completed=completed, not_started=len(not_started),
                errors=len(errors), first_errors=errors[:3],
                bad_lengths=len(bad_lengths), wall_s=wall, requests_per_s=completed / wall,
                x_realtime=sum(audio_s) / wall,
                p50_s=statistics.median(latencies) if latencies else None,
                # The nearest rank: the smallest latency that 99% of requests do not exceed.
                p99_s=latencies[math.ceil(0.99 * len(latencies)) - 1] if latencies else None,
                recompiles=after["recompiles"] - before["recompiles"],
                new_frames=after["frames_compiled"] - before["frames_compiled"],
                rss_start_mib=rss_start, rss_end_mib=rss_mib(), rss_every_50=rss_trace,
                **({"gpu_allocated_every_50": gpu_trace} if gpu else {}))


def soak_document(requests: int = 500, clients: int = 4, tokens=TOKENS, lone_requests: int = 0, preset=None,
                  device=None, time_limit_s: float = 600, s3gen_steps="recommended", startup: bool = False,
                  batch_requests: int = 1) -> dict:
    """Start a session (default steps, or `s3gen_steps`, see `TTSSession`), serve it on loopback and
    soak it: first `lone_requests` from one client at the longest of `tokens` with the voice the
    warm-up cached (the lone latency), then `requests` from `clients` clients, texts and both bundled
    voices mixed. Returns a results document; `startup_s` is the time from creating the session to
    the end of its warm-up, when the first request can be served, and `startup_stages_s` its
    stages. `startup`: first measure a fresh process's start-up from empty compile caches and
    then warm (`startup.cold_and_warm`), before this process touches the GPU. `batch_requests` > 1:
    the `requests` are sent without seeds (so they may be batched), first to the session serving one
    at a time, then with `batch_requests`: both in `one_at_a_time` and the report, in one process."""
    from chatterbox_lab.measure.startup import cold_and_warm
    from chatterbox_lab.records import results
    from chatterbox_lab.s3gen.s3gen_steps import s3gen_steps_of
    from chatterbox_lab.serving.server import create_app
    from chatterbox_lab.serving.session import TTSSession

    fresh_starts = cold_and_warm(preset, device, s3gen_steps, max(tokens)) if startup else None
    start = time.perf_counter()
    session = TTSSession(preset=preset, device=device, max_new_tokens=max(tokens), s3gen_steps=s3gen_steps,
                         batch_requests=batch_requests, progress=True)
    lone = None
    try:
        warmup_s = session.warmup()
        startup_s = time.perf_counter() - start
        on_gpu = str(session.tts.device).startswith("cuda")
        if on_gpu:
            torch.cuda.synchronize()
            gpu_start = torch.cuda.memory_allocated() / 2**20
        with LoopbackServer(create_app(session)) as server:
            if lone_requests:
                longest = max(tokens)
                lone = run_soak(server.url, ["alto"], requests=lone_requests, clients=1, tokens=(longest, longest),
                                time_limit_s=time_limit_s, gpu=on_gpu)
            mixed = dict(requests=requests, clients=clients, tokens=tokens, time_limit_s=time_limit_s, gpu=on_gpu)
            one_at_a_time = None
            if batch_requests > 1:
                session.batch_requests = 1
                one_at_a_time = run_soak(server.url, ["alto", "tenor"], seeded=False, **mixed)
                session.batch_requests = batch_requests
            report = run_soak(server.url, ["alto", "tenor"], seeded=one_at_a_time is None, **mixed)
    finally:
        session.close()  # its worker thread, not left to the interpreter's exit
    report.update(warmup_s=warmup_s, startup_s=startup_s, startup_stages_s=session.startup_s)
    if fresh_starts is not None:
        report["fresh_process_startup"] = fresh_starts
    if lone is not None:
        report["lone_client"] = {k: v for k, v in lone.items() if not k.endswith("_every_50")}
    if one_at_a_time is not None:
        report.update(batch_requests=batch_requests, batches_served=dict(sorted(session.batches_served.items())),
                      one_at_a_time={k: v for k, v in one_at_a_time.items() if not k.endswith("_every_50")})
    if on_gpu:
        report.update(gpu_allocated_start_mib=gpu_start, gpu_allocated_end_mib=torch.cuda.memory_allocated() / 2**20,
                      peak_vram_mib=torch.cuda.max_memory_allocated() / 2**20)
    doc = dict(schema=results.SCHEMA, rungs={"soak": report}, checks={},
               provenance=results.provenance(device=str(session.tts.device), preset=session.tts.preset,
                                             text="soak.TEXTS", tokens=list(tokens), requests=requests,
                                             clients=clients, s3gen_steps=sorted(s3gen_steps_of(session.tts)),
                                             t3_steps=sorted(session.decoder.steps),
                                             picks=session.decoder.picks.to_json()))
    return results.validate(doc)
