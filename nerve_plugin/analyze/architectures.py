"""FFN layouts of known model families, and how a model's layout is found.

An ``Architecture`` names, relative to one transformer block, the module whose output is the FFN's
pre-activation (the nonlinearity's input) and the module whose input is its post-activation (W_down's input):

    non-gated:  down(act(up(x)))              pre = up's output,    post = down's input
    gated:      down(act(gate(x)) * up(x))    pre = gate's output,  post = down's input

``block_path`` is the container whose children are the blocks. It may be given from the model's root or as a
suffix of it ("h" finds "transformer.h" in GPT2LMHeadModel and "h" in GPT2Model), so one entry serves a base
model and its task heads.

Nothing here imports transformers: HuggingFace models are recognised by ``model.config.model_type`` (a string)
and, failing that, by their module structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..taps import BUILTIN_SPECS, TapPoint, TapSpec, canonical_name, find_blocks, find_module


class ArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    name: str
    block_path: str
    up: str
    down: str
    gated: bool = False
    gate: str | None = None  # gated FFNs: the projection whose output enters the nonlinearity
    model_types: tuple[str, ...] = ()  # HuggingFace config.model_type values that use this layout
    description: str = ""

    def __post_init__(self):
        for key in ("name", "block_path", "up", "down"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ArchitectureError(
                    f"register_architecture: {key} must be a non-empty string, got {getattr(self, key)!r}"
                )
        if self.gated and not self.gate:
            raise ArchitectureError(
                f"register_architecture({self.name!r}): gated=True needs gate=, the projection whose output "
                f"enters the nonlinearity (e.g. gate='mlp.gate_proj'); up= names the linear branch"
            )
        if not self.gated and self.gate:
            raise ArchitectureError(
                f"register_architecture({self.name!r}): gate={self.gate!r} given with "
                "gated=False; pass gated=True for a gated FFN"
            )

    @property
    def pre(self) -> str:
        """The module whose output is the pre-activation."""
        return self.gate if self.gated else self.up

    def spec(self, blocks: str) -> TapSpec:
        return TapSpec(blocks=blocks, pre=TapPoint(self.pre, "output"), post=TapPoint(self.down, "input"))

    def modules(self) -> tuple[str, ...]:
        """Every module a block of this layout must have."""
        return (self.up, self.down) + ((self.gate,) if self.gated else ())


def _gated(name, block_path, model_types, description):
    return Architecture(
        name,
        block_path,
        up="mlp.up_proj",
        down="mlp.down_proj",
        gated=True,
        gate="mlp.gate_proj",
        model_types=model_types,
        description=description,
    )


# Module names as in HuggingFace transformers' implementations.
_BUILTIN = [
    Architecture(
        "gpt2",
        "h",
        up="mlp.c_fc",
        down="mlp.c_proj",
        model_types=("gpt2",),
        description="GPT-2: Conv1D c_fc -> gelu -> c_proj (the activation is a function in the MLP)",
    ),
    Architecture(
        "gpt_neox",
        "layers",
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
        model_types=("gpt_neox",),
        description="GPT-NeoX / Pythia: dense_h_to_4h -> gelu -> dense_4h_to_h",
    ),
    Architecture(
        "gptj",
        "h",
        up="mlp.fc_in",
        down="mlp.fc_out",
        model_types=("gptj",),
        description="GPT-J: fc_in -> gelu -> fc_out",
    ),
    _gated("llama", "layers", ("llama",), "LLaMA: down_proj(silu(gate_proj x) * up_proj x)"),
    _gated("mistral", "layers", ("mistral",), "Mistral: down_proj(silu(gate_proj x) * up_proj x)"),
    _gated("qwen2", "layers", ("qwen2",), "Qwen2: down_proj(silu(gate_proj x) * up_proj x)"),
    _gated("gemma", "layers", ("gemma",), "Gemma: down_proj(gelu_tanh(gate_proj x) * up_proj x)"),
    Architecture(
        "phi",
        "layers",
        up="mlp.fc1",
        down="mlp.fc2",
        model_types=("phi",),
        description="Phi (1, 1.5, 2): fc1 -> gelu -> fc2",
    ),
    Architecture(
        "bert",
        "encoder.layer",
        up="intermediate.dense",
        down="output.dense",
        model_types=("bert", "roberta"),
        description="BERT-style encoders: intermediate.dense -> gelu -> output.dense",
    ),
    # The training taps' own spec: pre = w1's output (the gate when gated), post = w2's input, gated or not.
    Architecture(
        "torchtitan_llama",
        BUILTIN_SPECS["llama3"].blocks,
        up=BUILTIN_SPECS["llama3"].pre.module,
        down=BUILTIN_SPECS["llama3"].post.module,
        description="torchtitan llama3 / nerve_llama: feed_forward.w2(act(w1 x) [* w3 x])",
    ),
]

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _BUILTIN}


def register(arch: Architecture, overwrite: bool = False) -> Architecture:
    if arch.name in ARCHITECTURES and not overwrite and ARCHITECTURES[arch.name] != arch:
        raise ArchitectureError(
            f"an architecture named {arch.name!r} is already registered (pass overwrite=True to replace it)"
        )
    for other in ARCHITECTURES.values():
        clash = set(arch.model_types) & set(other.model_types)
        if other.name != arch.name and clash:
            raise ArchitectureError(f"model_type {sorted(clash)[0]!r} already belongs to architecture {other.name!r}")
    ARCHITECTURES[arch.name] = arch
    return arch


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


# -- finding a layout in a model -------------------------------------------------------------------------------


@dataclass
class Resolved:
    """An architecture located in a model: the full path of its block container and the tap spec."""

    architecture: Architecture
    blocks: str
    spec: TapSpec = field(init=False)

    def __post_init__(self):
        self.spec = self.architecture.spec(self.blocks)


def locate(model: nn.Module, arch: Architecture) -> Resolved:
    """Where ``arch``'s blocks are in ``model``; raises ArchitectureError if its modules are not there."""
    wanted = canonical_name(arch.block_path)
    containers = []
    for name, module in model.named_modules():
        name = canonical_name(name)
        if (name == wanted or name.endswith("." + wanted)) and name not in containers:
            containers.append(name)
    if not containers:
        raise ArchitectureError(
            f"architecture {arch.name!r}: no module at block_path {arch.block_path!r} "
            f"(nor ending in it) in {type(model).__name__}"
        )
    found = [c for c in containers if _has_ffn(model, c, arch)]
    if not found:
        raise ArchitectureError(
            f"architecture {arch.name!r}: no block under {', '.join(map(repr, containers))} has "
            f"{' and '.join(map(repr, arch.modules()))}"
        )
    if len(found) > 1:
        raise ArchitectureError(
            f"architecture {arch.name!r}: block_path {arch.block_path!r} matches "
            f"{', '.join(map(repr, found))}; give the full path from the model's root"
        )
    return Resolved(arch, found[0])


def _has_ffn(model: nn.Module, container: str, arch: Architecture) -> bool:
    try:
        blocks = find_blocks(model, TapSpec(container, TapPoint(arch.pre, "output"), TapPoint(arch.down, "input")))
    except ValueError:
        return False
    return any(all(find_module(block, m) is not None for m in arch.modules()) for _, block in blocks)


def detect(model: nn.Module, name: str | None = None) -> Resolved:
    """The layout of ``model``: the architecture called ``name``; else the one registered for its
    ``config.model_type``; else the only registered layout its module structure matches."""
    if name is not None:
        if name not in ARCHITECTURES:
            raise ArchitectureError(
                f"unknown architecture {name!r}: expected one of {supported()} "
                "(or add yours with NerVEAnalyzer.register_architecture)"
            )
        return locate(model, ARCHITECTURES[name])

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str):
        for arch in ARCHITECTURES.values():
            if model_type in arch.model_types:
                return locate(model, arch)

    matches: dict[tuple, list[Resolved]] = {}
    for arch in ARCHITECTURES.values():
        try:
            resolved = locate(model, arch)
        except ArchitectureError:
            continue
        # LLaMA, Mistral, Qwen2 and Gemma share module names: one layout, whichever name found it first.
        matches.setdefault((resolved.blocks, resolved.spec.pre, resolved.spec.post), []).append(resolved)
    if len(matches) == 1:
        return next(iter(matches.values()))[0]
    what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
    if not matches:
        raise ArchitectureError(
            f"cannot find the FFN layout of {what}: supported architectures are {supported()}. For another "
            "model, register its layout: NerVEAnalyzer.register_architecture(name, block_path=..., up=..., "
            "down=..., gated=...)"
        )
    options = "; ".join(f"{r[0].architecture.name} (blocks {r[0].blocks!r})" for r in matches.values())
    raise ArchitectureError(f"the FFN layout of {what} is ambiguous: {options}. Pass architecture=NAME")
