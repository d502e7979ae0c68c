"""The lab bench: measure any set of decoder steps on a text and voice of your choice.

`measure` is a plain function over the benchmark's own measurement (`bench.measure_steps`):
T3 decode rate, RTF, per-token kernel / launch / operator counts, peak memory, compile
time and the audio. `LabBench` is a widget that only collects its arguments, calls it and
shows what comes back: one panel for one step set, one comparing two side by side.
"""
from __future__ import annotations

import contextlib
import functools
import html
import io
from dataclasses import dataclass
from types import SimpleNamespace

import ipywidgets as widgets
from IPython.display import HTML, Audio, Image

from chatterbox_lab.measure import bench, profiling
from chatterbox_lab.decode import precision
from chatterbox_lab.records import results
from chatterbox_lab import registry
from chatterbox_lab.decode.plan import device_kind
from chatterbox_lab.pipeline.synthesis import Synthesis
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.validation import MAX_NEW_TOKENS, check_text, check_token_count
from chatterbox_lab.pipeline.voices import bundled_voices, voice_path

# (figure, row label) of the results table, in display order.
TABLE_ROWS = (
    ("t3_decode_tok_s", "T3 decode tokens/s"),
    ("rtf", "RTF (wall s per audio s)"),
    ("gpu_kernels_per_token", "GPU kernels / token"),
    ("host_launches_per_token", "host launches / token"),
    ("cpu_ops_per_token", "CPU operators / token"),
    ("peak_vram_mib", "peak GPU memory (MiB)"),
    ("compile_s", "compile + warm-up (s)"),
    ("tokens", "speech tokens"),
    ("trace", "trace (open at ui.perfetto.dev)"),
)
COUNT_FIGURES = ("gpu_kernels_per_token", "host_launches_per_token", "cpu_ops_per_token")


@dataclass
class Measurement:
    steps: tuple          # in registry.T3_STEPS order; () is upstream's own loop
    figures: dict         # the benchmark's figures for these steps (see bench.measure_steps)
    synthesis: Synthesis  # the first timed run: wav, sample_rate, speech_tokens

    @property
    def label(self) -> str:
        return " + ".join(self.steps) or "upstream"


def measure(tts, voice, text: str, steps, tokens: int, *, repeats: int | None = None, seed: int = 0,
            sampling: SamplingParams = SamplingParams(), progress=None, trace_dir=None) -> Measurement:
    """Measure one configuration: `steps` (names from registry.T3_STEPS; empty: upstream's loop)
    decoding `tokens` speech tokens of `text` in `voice` (a bundled voice's name or an audio
    path). `repeats` timed runs, 2 on a CPU and 3 on a GPU by default. `progress`: anything
    with tqdm's `update()`. T3 is left as it was, even with the bf16 step (which casts it).

    Each measurement ends with its profile, and a profiler session leaves the process's later
    decodes slower (about half a percent on an H100): a difference that small between two
    measurements here is no evidence. `bench` times every rung before it profiles any.

    `trace_dir` (e.g. "runs"): also write the profiled run, a few decode steps after the
    warm-up, as `<trace_dir>/<steps>/<host>.pt.trace.json.gz` (its path is in
    `figures["trace"]`). Open it at ui.perfetto.dev (drag the file in), or with TensorBoard's
    profiler plugin (`tensorboard --logdir runs`; torch-tb-profiler is deprecated upstream)."""
    if isinstance(steps, str):
        raise TypeError(f"steps must be a collection of step names, e.g. ({steps!r},), not a string")
    steps = tuple(step for step in registry.T3_STEPS if step in registry.check(steps, model="t3"))
    cfg = bench.BenchConfig(device=tts.device, text=check_text(text), tokens=check_token_count(tokens),
                            repeats=repeats, seed=seed, sampling=sampling).resolved()
    path = voice_path(voice)
    restored = precision.weights_restored(tts.t3) if "bf16" in steps else contextlib.nullcontext()
    trace = profiling.trace_path_for(trace_dir, "+".join(steps) or "upstream") if trace_dir else None
    with restored:
        figures, synthesis = bench.measure_steps(tts, steps, cfg, path, progress, trace=trace)
    # Each measurement builds a new decoder, and each compiles its step again; past
    # torch's recompile limit the step would quietly run eagerly and the figures would
    # describe something else.
    if "compiled" in steps and cfg.device.startswith("cuda") and not figures.get("graph_launches_per_token"):
        raise RuntimeError("the compiled step did not replay as a CUDA graph, so these figures would not be "
                           "the compiled step's; after many compiled runs in one kernel torch's recompile "
                           "limit may be reached: restart the kernel and measure again")
    return Measurement(steps, figures, synthesis)


def table_html(measurements: dict[str, Measurement]) -> str:
    """One column per named measurement; with more than one, the T3 speed-up over the first."""
    names = list(measurements)
    head = "".join(f"<th>{html.escape(name)}<br><small>{html.escape(m.label)}</small></th>"
                   for name, m in measurements.items())
    rows = [(label, [html.escape(results.fmt(m.figures.get(key))) for m in measurements.values()])
            for key, label in TABLE_ROWS]
    if len(names) > 1:
        base = measurements[names[0]].figures["t3_decode_tok_s"]
        rows.append((f"T3 speed-up over {names[0]}",
                     [f"{m.figures['t3_decode_tok_s'] / base:.2f}x" for m in measurements.values()]))
    body = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                   for label, values in rows)
    return f"<table class='cblab-results'><tr><th></th>{head}</tr>{body}</table>"


def plot(measurements: dict[str, Measurement]):
    """T3 decode rate and the per-token counts this device has, one bar per named measurement."""
    # A bare Figure, outside pyplot: nothing for an inline backend to show a second time.
    from matplotlib.figure import Figure

    figures = {name: m.figures for name, m in measurements.items()}
    fig = Figure(figsize=(9, 3))
    rate, counts = fig.subplots(1, 2)
    rate.bar(list(figures), [f["t3_decode_tok_s"] for f in figures.values()], color="tab:green")
    rate.set_title("T3 decode tokens/s")
    present = tuple(key for key in COUNT_FIGURES if any(f.get(key) is not None for f in figures.values()))
    profiling.plot_counts(figures, keys=present, ax=counts)
    counts.set_title("per token")
    fig.tight_layout()
    return fig


class StepPicker(widgets.VBox):
    """A checkbox per decoder step. Switching a step on switches on what it needs; switching
    one off switches off what needs it: the selection is always a step set the decoder takes."""

    def __init__(self, title: str, steps=()):
        chosen = registry.check(steps, model="t3")
        # The right margin keeps each step's name beside its own box, well apart from the next box.
        self.boxes = {step: widgets.Checkbox(value=step in chosen, description=step, indent=False,
                                             layout=widgets.Layout(width="auto", margin="0 1.6em 0 0"))
                      for step in registry.T3_STEPS}
        for step, box in self.boxes.items():
            box.observe(functools.partial(self._keep_valid, step), names="value")

        def row(caption, steps):
            # Wrapped, so a row of many steps stays visible instead of scrolling sideways.
            return widgets.HBox([widgets.Label(caption, layout=widgets.Layout(width="9em")),
                                 *(self.boxes[s] for s in steps)], layout=widgets.Layout(flex_flow="row wrap"))
        by_status = {status: [s for s in registry.T3_STEPS if registry.STEPS[s].status == status]
                     for status in registry.STATUSES}
        super().__init__([widgets.HTML(f"<b>{html.escape(title)}</b>"),
                          *(row(status, steps) for status, steps in by_status.items())])

    @property
    def steps(self) -> tuple:
        return tuple(step for step, box in self.boxes.items() if box.value)

    def _keep_valid(self, step: str, change) -> None:
        for linked in registry.requirements(step) if change["new"] else registry.dependents(step):
            self.boxes[linked].value = change["new"]


class _Panel(widgets.VBox):
    """Named step pickers, a Run button that measures each with `measure_one(steps, say)`, and
    the results of the last run."""

    def __init__(self, pickers: dict[str, StepPicker], measure_one, button: str):
        self.pickers, self.measure_one = pickers, measure_one
        self.run_button = widgets.Button(description=button, button_style="primary", icon="play")
        self.run_button.on_click(self._run)
        self.status = widgets.HTML()
        self.table = widgets.HTML()
        self.chart = widgets.Output()
        self.audio = widgets.Output()
        super().__init__([widgets.HBox(list(pickers.values())), widgets.HBox([self.run_button, self.status]),
                          self.table, self.chart, self.audio])

    def _run(self, _button) -> None:
        self.run_button.disabled = True
        try:
            measured = {name: self.measure_one(picker.steps, functools.partial(self._say, name))
                        for name, picker in self.pickers.items()}
            self._show(measured)
            self.status.value = "done"
        # A click handler's exception would only reach the browser's log console, unseen.
        except Exception as exc:
            self.status.value = (f"<span style='color:#b00020'>{html.escape(type(exc).__name__)}: "
                                 f"{html.escape(str(exc))}</span>")
        finally:
            self.run_button.disabled = False

    def _say(self, name: str, what: str) -> None:
        self.status.value = html.escape(f"{name}: {what}")

    def _show(self, measured: dict[str, Measurement]) -> None:
        self.table.value = table_html(measured)
        png = io.BytesIO()
        plot(measured).savefig(png, format="png", dpi=90)
        # Set and appended rather than printed inside `with output:`, which only captures
        # under a running kernel: this way a headless run holds the same outputs.
        self.chart.outputs = ()
        self.chart.append_display_data(Image(data=png.getvalue(), format="png"))
        self.audio.outputs = ()
        for name, m in measured.items():
            if len(measured) > 1:
                self.audio.append_display_data(HTML(f"<b>{html.escape(name)}</b>: {html.escape(m.label)}"))
            self.audio.append_display_data(Audio(m.synthesis.wav, rate=m.synthesis.sample_rate))


class LabBench(widgets.VBox):
    """Voice, text, token count and repeats shared by two panels: measure one step set, or
    compare two. Every run goes through `measure`."""

    def __init__(self, tts, text: str = bench.DEFAULT_TEXT):
        self.tts = tts
        defaults = bench.BenchConfig(device=tts.device).resolved()
        self.voice = widgets.Dropdown(options=list(bundled_voices()), description="voice")
        self.text = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="40em"))
        self.tokens = widgets.BoundedIntText(value=defaults.tokens, min=1, max=MAX_NEW_TOKENS,
                                             description="tokens")
        self.repeats = widgets.BoundedIntText(value=defaults.repeats, min=1, max=20, description="repeats")
        self.trace = widgets.Checkbox(value=False, description="write a trace to runs/", indent=False)
        # As the session does: the recommended steps for this device, against the guide's four.
        recommended = registry.preset("recommended", device_kind(tts.device))
        self.single = _Panel({"this run": StepPicker("steps", recommended)}, self._measure, "Run")
        self.compare = _Panel({"A": StepPicker("A", registry.GUIDE), "B": StepPicker("B", recommended)},
                              self._measure, "Run A and B")
        tabs = widgets.Tab([self.single, self.compare], titles=("Measure", "Compare A / B"))
        super().__init__([self.voice, self.text, widgets.HBox([self.tokens, self.repeats, self.trace]), tabs])
        self.add_class("cblab-lab-bench")

    def _measure(self, steps: tuple, say) -> Measurement:
        """`measure` with this widget's inputs, telling `say` what it is doing."""
        n = self.repeats.value
        # measure_steps reports after the warm-up and after each timed run; the profile comes last.
        following = iter([f"measuring, run {i} of {n}…" for i in range(1, n + 1)] + ["profiling…"])
        say("compiling and warming up…" if "compiled" in steps else "warming up…")
        return measure(self.tts, self.voice.value, self.text.value, steps, self.tokens.value,
                       repeats=n, progress=SimpleNamespace(update=lambda: say(next(following))),
                       trace_dir="runs" if self.trace.value else None)
