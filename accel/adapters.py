"""Model adapters: how the plugin finds the blocks and components of a transformer.

An adapter is a frozen :class:`ModelSpec` registered for one exact transformer class. It names the block
stacks (``transformer_blocks``, ``single_transformer_blocks``, ...), the components inside each block that a
schedule can recompute or reuse (self-attention, cross-attention, feed-forward, ...), and which forward
arguments the block's outputs update, so that a whole block can be replaced by its cached residual.

Adapters for the diffusers models live in ``accel.pipelines``; a model without one can still be accelerated
by passing a spec by hand::

    spec = ModelSpec(stacks=(BlockStack(path="blocks", components=(
        Component(name="self_attn", module="attn1"), Component(name="ffn", module="ff"))),))
    accel.apply(my_transformer, config, spec=spec)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Canonical component names, in the order a schedule lists them when a model has them.
CANONICAL_COMPONENTS = (
    "self_attn",
    "joint_attn",
    "cross_attn",
    "ffn",
    "ffn_context",
    "mlp",
)


@dataclass(frozen=True, kw_only=True)
class Component:
    """One reusable part of a block.

    Attributes:
        name: the schedule's name for it, e.g. ``"self_attn"``, ``"cross_attn"``, ``"ffn"``.
        module: the attribute of the block that holds the submodule, e.g. ``"attn1"``.
    """

    name: str
    module: str

    def __post_init__(self):
        if not self.name or not self.module:
            raise ValueError(f"Component needs a name and a module attribute, got {self!r}")


@dataclass(frozen=True, kw_only=True)
class BlockStack:
    """A list of identical blocks on the transformer, run in order, each on the outputs of the one before (so a
    run of blocks reused whole adds up to the sum of their residuals).

    Attributes:
        path: dotted attribute path from the transformer to the ``nn.ModuleList``, e.g. ``"transformer_blocks"``.
        components: the reusable submodules of each block. A block may lack one (set to ``None``); that
            entry of the schedule is then ignored.
        outputs: for each element the block's forward returns (one name for a single tensor), the name of the
            forward argument it is the updated value of, e.g. ``("encoder_hidden_states", "hidden_states")``.
            ``None`` marks an output that is not a residual update; then the block is never skipped whole.
    """

    path: str
    components: tuple[Component, ...]
    outputs: tuple[str | None, ...] = ("hidden_states",)

    def __post_init__(self):
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"BlockStack {self.path!r} names a component twice: {names}")
        if not self.outputs:
            raise ValueError(f"BlockStack {self.path!r} needs at least one output name")

    @property
    def skippable(self) -> bool:
        """Whether a whole block can be replaced by input + cached residual."""
        return all(name is not None for name in self.outputs)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where the blocks of a transformer are and what a schedule may reuse inside them.

    Attributes:
        stacks: the block stacks in the order the forward runs them.
        timestep_arg: the forward argument carrying the diffusion timestep (used to track steps).
    """

    stacks: tuple[BlockStack, ...]
    timestep_arg: str = "timestep"

    def __post_init__(self):
        if not self.stacks:
            raise ValueError("ModelSpec needs at least one BlockStack")

    @property
    def component_names(self) -> tuple[str, ...]:
        """The union of component names over all stacks, canonical ones first in canonical order."""
        seen = {c.name for stack in self.stacks for c in stack.components}
        ordered = [name for name in CANONICAL_COMPONENTS if name in seen]
        extra = sorted(seen - set(CANONICAL_COMPONENTS))
        return tuple(ordered + extra)

    def block_list(self, transformer: torch.nn.Module) -> list[tuple[BlockStack, torch.nn.Module]]:
        """All blocks of ``transformer`` in execution order, each with its stack."""
        blocks = []
        for stack in self.stacks:
            module = transformer
            for part in stack.path.split("."):
                if not hasattr(module, part):
                    raise ValueError(
                        f"{type(transformer).__name__} has no attribute path {stack.path!r} named by its spec"
                    )
                module = getattr(module, part)
            blocks.extend((stack, block) for block in module)
        return blocks


#: The components of the common DiT block (PixArt, Sana, LTX-Video): self-attention ``attn1``,
#: cross-attention ``attn2`` and feed-forward ``ff``.
SELF_CROSS_FFN = (
    Component(name="self_attn", module="attn1"),
    Component(name="cross_attn", module="attn2"),
    Component(name="ffn", module="ff"),
)


_ADAPTERS: dict[type, ModelSpec] = {}


def register_model(model_class: type, spec: ModelSpec) -> None:
    """Register ``spec`` as the adapter for exactly ``model_class`` (subclasses are not matched)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    _ADAPTERS[model_class] = spec


def supported_models() -> list[str]:
    """Names of the transformer classes that have a registered adapter."""
    _load_builtin_adapters()
    return sorted(cls.__name__ for cls in _ADAPTERS)


def spec_for(transformer: torch.nn.Module, spec: ModelSpec | None = None) -> ModelSpec:
    """The adapter spec for ``transformer``: ``spec`` if given, else the one registered for its exact class.

    Raises:
        ValueError: the class has no adapter; the message lists the supported classes and shows how to
            describe the blocks by hand.
    """
    if spec is not None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        return spec
    _load_builtin_adapters()
    found = _ADAPTERS.get(type(transformer))
    if found is None:
        raise ValueError(
            f"No adapter for {type(transformer).__name__}. Supported: {', '.join(supported_models())}.\n"
            "Describe the blocks by hand and pass the spec, e.g.\n"
            "  from accel.adapters import BlockStack, Component, ModelSpec\n"
            "  spec = ModelSpec(stacks=(BlockStack(path='transformer_blocks', components=(\n"
            "      Component(name='self_attn', module='attn1'), Component(name='ffn', module='ff'))),))\n"
            "  accel.apply(pipe, config, spec=spec)"
        )
    return found


def _load_builtin_adapters() -> None:
    # Importing the package registers every adapter file in it.
    import accel.pipelines  # noqa: F401
