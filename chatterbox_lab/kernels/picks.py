"""Kernel picks: the configurations our decode kernels run with, as one immutable object passed in.

A pick is a configuration tuned on a card for one call of the one-token step: the matvecs (`qkv`,
`o_proj`, `gate_up`, `down`, the speech `head`), `attention`, the `sampling` kernel and the
experimental whole-`layer` kernel. The chain tuning finds them
(`tuning.chain_tuning`), every bench record saves them, and a decoder takes them when it is built
(`T3Decoder(picks=...)`), so a rung's speed never depends on what ran before it in the process.
Calls without a pick run their kernel's default.

The picks of committed records ship with the package (`shipped/`, one file per card model, written by
`python -m chatterbox_lab ship-picks RECORD`), so a fresh process on such a card starts at the tuned
rate without tuning (`shipped_for`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatterbox_lab.kernels import decode_attention, fused_matvec, fused_sampling, quantized, staged_matvec
from chatterbox_lab.kernels.decode_attention import AttentionConfig
from chatterbox_lab.kernels.experimental import persistent_layer
from chatterbox_lab.kernels.experimental.persistent_layer import LayerConfig
from chatterbox_lab.kernels.fused_matvec import KernelConfig
from chatterbox_lab.kernels.fused_sampling import SamplingConfig
from chatterbox_lab.kernels.staged_matvec import StagedConfig

MATVEC_CALLS = ("qkv", "o_proj", "gate_up", "down", "head")
# A matvec's picks per weight format: 8-bit rows are half the bytes of bf16 ones, so another
# configuration may be fastest. The knob of call `qkv` under int8 weights is `qkv_int8`.
FORMAT_CALLS = tuple(f"{call}_{format}" for format in quantized.FORMATS for call in MATVEC_CALLS)
KNOBS = ("attention",) + MATVEC_CALLS + FORMAT_CALLS + ("sampling", "layer")
_KINDS = {"attention": (AttentionConfig,), "sampling": (SamplingConfig,), "layer": (LayerConfig,)}
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def name_of(config) -> str:
    """A configuration's short name, as records store it."""
    if isinstance(config, AttentionConfig):
        return f"s{config.splits}_p{config.parts}_b{config.block}_w{config.warps}"
    if isinstance(config, StagedConfig):
        return f"staged_n{config.block_n}_c{config.chunk_k}_l{config.lanes_n}_wn{config.warps_n}_w{config.warps}"
    if isinstance(config, SamplingConfig):
        return f"sampling_w{config.warps}"
    if isinstance(config, LayerConfig):
        return f"t{config.tile_bytes // 2**10}k_w{config.warps}_p{config.programs_per_sm}"
    return f"n{config.block_n}_k{config.block_k}_w{config.warps}"


_NAMED = ((re.compile(r"s(\d+)_p(\d+)_b(\d+)_w(\d+)"), AttentionConfig),
          (re.compile(r"staged_n(\d+)_c(\d+)_l(\d+)_wn(\d+)_w(\d+)"), StagedConfig),
          (re.compile(r"sampling_w(\d+)"), SamplingConfig),
          (re.compile(r"t(\d+)k_w(\d+)_p(\d+)"), lambda tile, warps, per_sm: LayerConfig(tile * 2**10, warps, per_sm)),
          (re.compile(r"n(\d+)_k(\d+)_w(\d+)"), KernelConfig))


def config_named(name: str):
    """The configuration `name_of` calls `name`."""
    for pattern, kind in _NAMED:
        match = pattern.fullmatch(name)
        if match:
            return kind(*map(int, match.groups()))
    raise ValueError(f"{name!r} names no kernel configuration (see kernels.picks.name_of)")


@dataclass(frozen=True)
class KernelPicks:
    """`calls`: knob -> configuration (a `KernelConfig` for a Triton matvec, a `StagedConfig` for a
    staged one, an `AttentionConfig` for attention). `rows`: the rows of the step the matvec picks
    were tuned for (2, one CFG pair); other row counts run the defaults. `source`: where they came
    from (a record, or "defaults")."""
    calls: tuple = ()
    rows: int = 2
    source: str = "defaults"
    gpu: str | None = None
    by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        calls = dict(self.calls)
        unknown = sorted(set(calls) - set(KNOBS))
        if unknown:
            raise ValueError(f"no knob {unknown}: the knobs are {', '.join(KNOBS)}")
        for knob, config in calls.items():
            kinds = _KINDS.get(knob, (KernelConfig, StagedConfig))
            if not isinstance(config, kinds):
                raise ValueError(f"{knob} takes a {' or '.join(k.__name__ for k in kinds)}, got {config!r}")
        object.__setattr__(self, "calls", tuple(sorted(calls.items())))
        object.__setattr__(self, "by_name", calls)

    def matvec(self, call: str, rows: int, n: int, k: int, gated: bool = False,
               format: str | None = None) -> KernelConfig:
        """`format`: the 8-bit weight format the call reads (None: the model's dtype), whose picks
        are kept apart."""
        knob = f"{call}_{format}" if format else call
        pick = self.by_name.get(knob) if rows == self.rows else None
        return pick if isinstance(pick, KernelConfig) else fused_matvec.default_config(n, k, gated)

    def staged(self, call: str, rows: int, n: int, k: int, gated: bool = False) -> StagedConfig:
        pick = self.by_name.get(call) if rows == self.rows else None
        return pick if isinstance(pick, StagedConfig) else staged_matvec.default_config(n, k, gated)

    def attention(self, capacity: int) -> AttentionConfig:
        return self.by_name.get("attention") or decode_attention.default_config(capacity)

    def sampling_warps(self, vocab: int) -> int:
        pick = self.by_name.get("sampling")
        return pick.warps if pick else fused_sampling.default_warps(fused_sampling.blocks(vocab)[0])

    def layer(self) -> LayerConfig:
        return self.by_name.get("layer") or persistent_layer.DEFAULT_CONFIG

    def with_pick(self, knob: str, config) -> "KernelPicks":
        """These picks with `knob` set to `config` (None: its default)."""
        calls = {k: v for k, v in self.by_name.items() if k != knob}
        if config is not None:
            calls[knob] = config
        return replace(self, calls=tuple(calls.items()))

    def names(self) -> dict[str, str]:
        """As records store them: knob -> `name_of` its configuration."""
        return {knob: name_of(config) for knob, config in self.calls}

    @classmethod
    def from_names(cls, names: dict[str, str], **info) -> "KernelPicks":
        return cls(calls=tuple((knob, config_named(name)) for knob, name in names.items()), **info)

    def to_json(self) -> dict:
        return dict(gpu=self.gpu, source=self.source, rows=self.rows, calls=self.names())

    @classmethod
    def from_json(cls, doc: dict) -> "KernelPicks":
        return cls.from_names(doc["calls"], rows=doc.get("rows", 2), source=doc.get("source", "?"),
                              gpu=doc.get("gpu"))


DEFAULT = KernelPicks()


def _slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def shipped_for(gpu: str | None) -> KernelPicks:
    """The picks shipped for this card model (`torch.cuda.get_device_name`), else the defaults."""
    if not gpu:
        return DEFAULT
    path = SHIPPED_DIR / f"{_slug(gpu)}.json"
    return KernelPicks.from_json(json.loads(path.read_text())) if path.exists() else DEFAULT


def ship(picks: KernelPicks) -> Path:
    """Write `picks` as the shipped picks of their card model."""
    if not picks.gpu:
        raise ValueError("only picks tuned on a GPU can be shipped")
    SHIPPED_DIR.mkdir(exist_ok=True)
    path = SHIPPED_DIR / f"{_slug(picks.gpu)}.json"
    path.write_text(json.dumps(picks.to_json(), indent=1) + "\n")
    return path
