"""Model adapters: how the plugin finds the blocks and components of a transformer, and what techniques need
to know about them.

An adapter is a frozen :class:`ModelSpec` registered for one exact transformer class. It names the block
stacks (``transformer_blocks``, ``single_transformer_blocks``, ...), the components inside each block that a
schedule can recompute or reuse (self-attention, cross-attention, feed-forward, ...), and which forward
arguments the block's outputs update, so that a whole block can be replaced by its cached residual.

It also records what the other techniques need, as named fields:

* each :class:`Component`'s kind (attention or feed-forward), for attention the attribute holding its processor,
  whether it is self-, cross- or joint attention, and where its heads and width are read
  (:func:`accel.geometry.attention_geometry`);
* each :class:`BlockStack`'s forward arguments that are batch-major, shared by every sample, or indexed by token;
* the model's :class:`TokenLayout`: where the text tokens sit in the joint sequence, and how the visual tokens
  form a (frames, height, width) grid (:func:`accel.geometry.token_grid`, :func:`accel.geometry.patch_size`);
* whether the model family is trained with flow matching (:func:`is_flow_matching` prefers the scheduler).

Adapters for the diffusers models live in ``accel.pipelines``; a model without one can still be accelerated
by passing a spec by hand::

    spec = ModelSpec(stacks=(BlockStack(path="blocks", components=(
        Component(name="self_attn", module="attn1"), Component(name="ffn", module="ff"))),))
    accel.apply(my_transformer, config, spec=spec)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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

#: What a canonical component name implies when a spec leaves ``kind`` and ``attention`` unset.
_CANONICAL_KINDS: dict[str, tuple[str, str | None]] = {
    "self_attn": ("attention", "self"),
    "joint_attn": ("attention", "joint"),
    "cross_attn": ("attention", "cross"),
    "ffn": ("ffn", None),
    "ffn_context": ("ffn", None),
    "mlp": ("ffn", None),
}


@dataclass(frozen=True, kw_only=True)
class Component:
    """One reusable part of a block.

    Fields left at ``None`` are filled from the canonical ``name`` (``"self_attn"`` is self-attention with its
    processor in ``processor``, ``"ffn"`` a token-wise feed-forward, ...), so ``Component(name="self_attn",
    module="attn1")`` is complete. A component with another name and no ``kind`` is opaque to techniques that
    need a kind (they leave it alone).

    Attributes:
        name: the schedule's name for it, e.g. ``"self_attn"``, ``"cross_attn"``, ``"ffn"``.
        module: the attribute of the block that holds the submodule, e.g. ``"attn1"``.
        kind: ``"attention"`` (a diffusers attention module whose processor computes the attention) or
            ``"ffn"`` (a feed-forward or the first projection of one).
        attention: for attention: ``"self"`` (queries, keys and values from the visual tokens), ``"cross"``
            (keys and values from the text in ``encoder_hidden_states``) or ``"joint"`` (one attention over the
            text and visual tokens together, in the order :attr:`TokenLayout.text` says).
        streams: for joint attention: ``"separate"`` if the module receives the visual tokens as
            ``hidden_states`` and the text as ``encoder_hidden_states`` and joins them inside its processor,
            ``"merged"`` if the block already concatenated them into ``hidden_states``.
        processor_attr: for attention: the attribute of the module holding its attention processor, called as
            ``processor(module, hidden_states, ...)`` (diffusers' ``module.processor`` / ``set_processor``).
        kernel: for attention: ``"softmax"`` or ``"linear"`` (ReLU linear attention, e.g. Sana's self-attention:
            there is no attention map to sparsify).
        heads_attr: for attention: the module attribute giving the number of query heads.
        inner_dim_attr: for attention: the module attribute giving the query width, ``heads * head_dim``.
        token_wise: whether the component maps each token independently of the others (a per-token technique
            may run it on a subset of tokens). False for attention and for convolutional feed-forwards.
    """

    name: str
    module: str
    kind: Literal["attention", "ffn"] | None = None
    attention: Literal["self", "cross", "joint"] | None = None
    streams: Literal["separate", "merged"] | None = None
    processor_attr: str | None = None
    kernel: Literal["softmax", "linear"] | None = None
    heads_attr: str | None = None
    inner_dim_attr: str | None = None
    token_wise: bool | None = None

    def __post_init__(self):
        if not self.name or not self.module:
            raise ValueError(f"Component needs a name and a module attribute, got {self!r}")
        canonical_kind, canonical_attention = _CANONICAL_KINDS.get(self.name, (None, None))
        kind = self.kind or ("attention" if self.attention else canonical_kind)
        if kind not in (None, "attention", "ffn"):
            raise ValueError(f"Component {self.name!r}: kind must be 'attention', 'ffn' or None, got {kind!r}")
        self._fill(kind=kind)
        if kind == "attention":
            self._fill_attention(self.attention or canonical_attention)
            return
        attention_only = ("attention", "streams", "processor_attr", "kernel", "heads_attr", "inner_dim_attr")
        given = [field for field in attention_only if getattr(self, field) is not None]
        if given:
            raise ValueError(f"Component {self.name!r} of kind {kind!r} sets attention-only fields {given}")
        self._fill(token_wise=kind == "ffn" if self.token_wise is None else self.token_wise)

    def _fill_attention(self, attention: str | None) -> None:
        if attention not in ("self", "cross", "joint"):
            raise ValueError(
                f"Attention component {self.name!r} needs attention='self', 'cross' or 'joint', got {attention!r}"
            )
        if self.streams not in (None, "separate", "merged") or (self.streams and attention != "joint"):
            raise ValueError(f"Component {self.name!r}: streams is 'separate' or 'merged', for joint attention only")
        if self.kernel not in (None, "softmax", "linear"):
            raise ValueError(f"Component {self.name!r}: kernel must be 'softmax' or 'linear', got {self.kernel!r}")
        if self.token_wise:
            raise ValueError(f"Attention component {self.name!r} mixes tokens; it cannot be token_wise")
        self._fill(
            attention=attention,
            streams=self.streams or ("separate" if attention == "joint" else None),
            processor_attr=self.processor_attr or "processor",
            kernel=self.kernel or "softmax",
            heads_attr=self.heads_attr or "heads",
            inner_dim_attr=self.inner_dim_attr or "inner_dim",
            token_wise=False,
        )

    def _fill(self, **values: Any) -> None:
        # Completes a frozen instance from its own arguments, once, in __post_init__.
        for field, value in values.items():
            object.__setattr__(self, field, value)


@dataclass(frozen=True, kw_only=True)
class BlockStack:
    """A list of identical blocks on the transformer, run in order, each on the outputs of the one before (so a
    run of blocks reused whole adds up to the sum of their residuals).

    Forward arguments are named as in the block's ``forward`` signature (the model may pass them by position).

    Attributes:
        path: dotted attribute path from the transformer to the ``nn.ModuleList``, e.g. ``"transformer_blocks"``.
        components: the reusable submodules of each block. A block may lack one (set to ``None``); that
            entry of the schedule is then ignored.
        outputs: for each element the block's forward returns (one name for a single tensor), the name of the
            forward argument it is the updated value of, e.g. ``("encoder_hidden_states", "hidden_states")``.
            ``None`` marks an output that is not a residual update; then the block is never skipped whole.
        batch_major: the forward arguments whose tensors (every tensor, for a tuple) have the batch dimension
            first; a technique that runs a subset of the samples slices them along dimension 0.
        shared: the tensor arguments that are the same for every sample (no batch dimension, or one of size 1),
            e.g. rotary embeddings; a subset of the samples takes them unchanged.
        token_axes: ``(argument, dimension)`` pairs: the dimension along which the argument's tensors run over
            the block's visual tokens, or over the joint sequence of text and visual tokens (ordered as
            :attr:`TokenLayout.text` says) where the argument covers both, e.g. FLUX's rotary embedding. A
            technique that changes which tokens a block sees gathers these.
    """

    path: str
    components: tuple[Component, ...]
    outputs: tuple[str | None, ...] = ("hidden_states",)
    batch_major: tuple[str, ...] = ("hidden_states",)
    shared: tuple[str, ...] = ()
    token_axes: tuple[tuple[str, int], ...] = (("hidden_states", 1),)

    def __post_init__(self):
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"BlockStack {self.path!r} names a component twice: {names}")
        if not self.outputs:
            raise ValueError(f"BlockStack {self.path!r} needs at least one output name")
        both = set(self.batch_major) & set(self.shared)
        if both:
            raise ValueError(f"BlockStack {self.path!r}: arguments {sorted(both)} cannot be batch-major and shared")

    @property
    def skippable(self) -> bool:
        """Whether a whole block can be replaced by input + cached residual."""
        return all(name is not None for name in self.outputs)


#: How ``hidden_states`` reaches the transformer's forward: channels first, video with channels before or after
#: the frames, or already a token sequence ``(batch, tokens, channels)``.
InputLayout = Literal["BCHW", "BCFHW", "BFCHW", "packed"]


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where the tokens a block sees come from.

    The visual tokens are the patches of the latent in raster order (frames, then rows, then columns, the last
    fastest) in every supported model. :func:`accel.geometry.token_grid` gives their ``(frames, height, width)``
    grid for one call; image models have one frame.

    Attributes:
        input: the layout of the forward's ``hidden_states``: ``"BCHW"`` (images), ``"BCFHW"`` or ``"BFCHW"``
            (video), or ``"packed"`` (the pipeline already made it a ``(batch, tokens, channels)`` sequence).
        text: where the text tokens are in the sequence an attention runs over: ``"first"`` or ``"last"`` for
            joint attention, ``"cross"`` when text only enters through cross-attention keys and values,
            ``"none"`` for models without text.
        patch_size_key: the config key of the model's patch size: an int (height = width) or a
            ``(frames, height, width)`` triple.
        patch_size_t_key: the config key of the temporal patch size when it is separate; ``None`` (or a config
            value of ``None``) means 1 unless ``patch_size_key`` holds a triple.
        packed_patch: the ``(frames, height, width)`` patch the pipeline folds into each token before the
            forward (FLUX packs 2x2 latent pixels), multiplied into :func:`accel.geometry.patch_size`.
        grid_args: for packed input: the forward arguments giving the latent's frames, height and width before
            the model's patching (LTX-Video's ``num_frames``, ``height``, ``width``).
        position_ids_arg: for packed input: the forward argument holding one ``(frame, row, column)`` id per
            visual token (FLUX's ``img_ids``), from which the grid is read.
    """

    input: InputLayout
    text: Literal["first", "last", "cross", "none"]
    patch_size_key: str = "patch_size"
    patch_size_t_key: str | None = None
    packed_patch: tuple[int, int, int] = (1, 1, 1)
    grid_args: tuple[str, str, str] | None = None
    position_ids_arg: str | None = None

    def __post_init__(self):
        if self.input not in ("BCHW", "BCFHW", "BFCHW", "packed"):
            raise ValueError(f"TokenLayout.input must be 'BCHW', 'BCFHW', 'BFCHW' or 'packed', got {self.input!r}")
        if self.text not in ("first", "last", "cross", "none"):
            raise ValueError(f"TokenLayout.text must be 'first', 'last', 'cross' or 'none', got {self.text!r}")
        if self.input == "packed" and (self.grid_args is None) == (self.position_ids_arg is None):
            raise ValueError("A packed TokenLayout needs exactly one of grid_args and position_ids_arg")
        if self.input != "packed" and (self.packed_patch != (1, 1, 1) or self.grid_args or self.position_ids_arg):
            raise ValueError("packed_patch, grid_args and position_ids_arg describe packed input only")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where the blocks of a transformer are and what a schedule may reuse inside them.

    Attributes:
        stacks: the block stacks in the order the forward runs them.
        timestep_arg: the forward argument carrying the diffusion timestep (used to track steps).
        token_layout: how the tokens are laid out; ``None`` when unknown (techniques that need it refuse).
        flow_matching: whether the family's published checkpoints are trained with flow matching (the
            velocity of a straight path from data to noise); ``None`` when unknown. The pipeline's scheduler
            says for one checkpoint: see :func:`is_flow_matching`.
    """

    stacks: tuple[BlockStack, ...]
    timestep_arg: str = "timestep"
    token_layout: TokenLayout | None = None
    flow_matching: bool | None = None

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


def is_flow_matching(pipe: Any, spec: ModelSpec | None = None) -> bool:
    """Whether ``pipe`` (a diffusers pipeline, or its scheduler) samples a flow-matching model.

    The scheduler decides when it can: a ``FlowMatch*`` scheduler, ``use_flow_sigmas`` or
    ``prediction_type="flow_prediction"`` mean yes, any other ``prediction_type`` (``"epsilon"``,
    ``"v_prediction"``, ...) means no. Otherwise the family's :attr:`ModelSpec.flow_matching` answers (``spec``,
    or the adapter of ``pipe.transformer``).

    Raises:
        ValueError: neither the scheduler nor the spec says.
    """
    scheduler = getattr(pipe, "scheduler", pipe)
    config = getattr(scheduler, "config", None) or {}
    if type(scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        return True
    prediction = config.get("prediction_type")
    if isinstance(prediction, str):
        return prediction == "flow_prediction"
    transformer = getattr(pipe, "transformer", None)
    if spec is None and transformer is not None:
        spec = spec_for(transformer)
    if spec is None or spec.flow_matching is None:
        raise ValueError(f"Cannot tell whether {type(pipe).__name__} is flow matching: no scheduler or spec says")
    return spec.flow_matching
