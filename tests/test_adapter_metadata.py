"""What the adapters tell techniques, checked against real forwards of the tiny models.

Attention components are diffusers attention modules whose processor does the work; heads x head width is the
query projection's width; the token grid counts the visual tokens that really reach each attention; the
arguments named batch-major, shared or per token have those shapes in a real call; token-wise components
really treat tokens independently.
"""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    LTXPipeline,
)
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from tiny_models import TINY_MODELS, TinyModel

from accel.adapters import (
    BlockStack,
    Component,
    ModelSpec,
    TokenLayout,
    is_flow_matching,
    spec_for,
)
from accel.geometry import attention_geometry, patch_size, token_grid

TINY = list(TINY_MODELS.values())

#: (frames, height, width) extent of one token in latent pixels, from each model family's published design.
PATCH = {
    "pixart": (1, 2, 2),
    "sd3": (1, 2, 2),
    "flux": (1, 2, 2),
    "sana": (1, 1, 1),
    "dit": (1, 2, 2),
    "wan": (1, 2, 2),
    "ltx": (1, 1, 1),
    "hunyuan_video": (1, 2, 2),
    "cogvideox": (1, 2, 2),
}


@pytest.fixture(params=TINY, ids=[tiny.name for tiny in TINY])
def tiny(request) -> TinyModel:
    return request.param


def _bound(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in an argument (a tensor, or nested tuples and lists of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _first_blocks(model, spec) -> list[tuple[BlockStack, torch.nn.Module]]:
    firsts = {}
    for stack, block in spec.block_list(model):
        firsts.setdefault(stack.path, (stack, block))
    return list(firsts.values())


def _capture(model, modules: list[torch.nn.Module], inputs: dict) -> dict[int, dict]:
    """One forward; the bound arguments of the first call of each of ``modules``, keyed by ``id``."""
    seen: dict[int, dict] = {}

    def pre_hook(module, args, kwargs):
        seen.setdefault(id(module), _bound(module, args, kwargs))

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for module in modules]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _inputs(tiny: TinyModel, batch: int, prompts=None) -> dict:
    return tiny.inputs(batch, 500.0, torch.Generator().manual_seed(0), prompts if prompts is not None else 1)


def test_every_adapter_fills_the_metadata(tiny):
    spec = spec_for(tiny.build())
    assert spec.token_layout is not None
    assert spec.flow_matching is not None
    for stack in spec.stacks:
        for component in stack.components:
            assert component.kind in ("attention", "ffn"), f"{stack.path}.{component.module}"
    joint = any(component.attention == "joint" for stack in spec.stacks for component in stack.components)
    assert (spec.token_layout.text in ("first", "last")) == joint
    assert (spec.token_layout.text == "none") == (tiny.name == "dit")


def test_attention_components_are_diffusers_attention_run_by_their_processor(tiny):
    model = tiny.build()
    spec = spec_for(model)
    calls: list[torch.nn.Module] = []
    swapped = []
    for stack, block in spec.block_list(model):
        for component in stack.components:
            module = getattr(block, component.module)
            if module is None:
                continue
            if component.kind != "attention":
                assert not isinstance(module, Attention | AttentionModuleMixin), f"{component.module} is attention"
                continue
            assert isinstance(module, Attention | AttentionModuleMixin), type(module).__name__
            assert callable(module.set_processor)
            original = getattr(module, component.processor_attr)
            assert original is module.get_processor()
            setattr(module, component.processor_attr, _counting_processor(original, calls))
            swapped.append((module, component.processor_attr, original))
    inputs = _inputs(tiny, 2)
    with torch.no_grad():
        counted = tiny.output(model(**inputs))
    for module, attr, original in swapped:
        setattr(module, attr, original)
    with torch.no_grad():
        reference = tiny.output(model(**inputs))

    assert torch.equal(counted, reference)
    assert sorted(map(id, calls)) == sorted(id(module) for module, _, _ in swapped), "one processor call each"


def _counting_processor(original, calls: list):
    """A processor that records which attention module called it, then calls ``original``.

    Its ``__call__`` carries the original's signature: diffusers' ``Attention.forward`` drops the keyword
    arguments a processor's signature does not name.
    """

    class CountingProcessor:
        def __call__(self, attn, *args, **kwargs):
            calls.append(attn)
            return original(attn, *args, **kwargs)

    CountingProcessor.__call__.__signature__ = inspect.signature(type(original).__call__)
    return CountingProcessor()


def test_attention_geometry_matches_the_query_projection_and_config(tiny):
    model = tiny.build()
    spec = spec_for(model)
    geometry = attention_geometry(model, spec)
    modules = [
        (stack, component, getattr(block, component.module))
        for stack, block in spec.block_list(model)
        for component in stack.components
        if component.kind == "attention" and getattr(block, component.module) is not None
    ]
    assert len(geometry) == len(modules)
    config = model.config
    for entry, (stack, component, module) in zip(geometry, modules, strict=True):
        assert (entry.stack, entry.component, entry.attention) == (stack.path, component.name, component.attention)
        assert entry.heads * entry.head_dim == module.to_q.out_features
        keys = ("num_attention_heads", "attention_head_dim")
        if tiny.name == "sana" and component.name == "cross_attn":  # Sana's cross-attention has its own heads
            keys = ("num_cross_attention_heads", "cross_attention_head_dim")
        assert (entry.heads, entry.head_dim) == (config[keys[0]], config[keys[1]])
    for stack in spec.stacks:
        blocks = sum(1 for block_stack, _ in spec.block_list(model) if block_stack is stack)
        assert sorted({entry.block for entry in geometry if entry.stack == stack.path}) == list(range(blocks))


def test_token_grid_counts_the_visual_tokens_reaching_every_attention(tiny):
    model = tiny.build()
    spec = spec_for(model)
    inputs = _inputs(tiny, 2)
    frames, height, width = grid = token_grid(model, spec, inputs)
    if spec.token_layout.input != "packed":
        assert token_grid(model, None, inputs["hidden_states"].shape) == grid
    else:
        with pytest.raises(ValueError, match="keyword arguments"):
            token_grid(model, None, inputs["hidden_states"].shape)
    assert frames == (2 if len(tiny.latent_shape) == 4 or tiny.name == "ltx" else 1)
    assert height == width > 1

    firsts = _first_blocks(model, spec)
    attentions = [
        (stack, block, component, getattr(block, component.module))
        for stack, block in firsts
        for component in stack.components
        if component.kind == "attention" and getattr(block, component.module) is not None
    ]
    seen = _capture(model, [block for _, block in firsts] + [module for *_, module in attentions], inputs)
    for stack, block, component, module in attentions:
        text = seen[id(block)]["encoder_hidden_states"].shape[1] if spec.token_layout.text != "none" else 0
        arguments = seen[id(module)]
        tokens = arguments["hidden_states"].shape[1]
        if component.streams == "merged":
            tokens -= text
        elif component.attention in ("joint", "cross"):
            assert arguments["encoder_hidden_states"].shape[1] == text, f"{stack.path}.{component.module}"
        assert tokens == math.prod(grid), f"{stack.path}.{component.module}: {tokens} tokens for grid {grid}"


@pytest.mark.parametrize("name", ["sd3", "flux", "hunyuan_video", "cogvideox"])
def test_text_tokens_sit_where_the_token_layout_says(name, monkeypatch):
    """Perturb a block's text and see which positions of the joint attention's queries change."""
    tiny = TINY_MODELS[name]
    model = tiny.build()
    spec = spec_for(model)
    assert spec.token_layout.text in ("first", "last")
    recording, queries = _recording_attention()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    for stack, block in _first_blocks(model, spec):
        for component in stack.components:
            if component.attention != "joint":
                continue
            module = getattr(block, component.module)
            runs = [_joint_queries(model, block, module, _inputs(tiny, 1), queries, perturb) for perturb in (0, 1)]
            (query, text), (perturbed, _) = runs
            changed = (query != perturbed).any(dim=3).any(dim=1).any(dim=0).nonzero().flatten().tolist()
            first = spec.token_layout.text == "first"
            expected = list(range(text)) if first else list(range(query.shape[2] - text, query.shape[2]))
            assert changed == expected, f"{stack.path}.{component.module}: text at {changed}"


def _recording_attention():
    """A ``scaled_dot_product_attention`` that records its query ``(batch, heads, sequence, head_dim)`` while
    ``queries`` holds a list (``queries[0]``), and computes as usual."""
    original = torch.nn.functional.scaled_dot_product_attention
    queries: list[list] = []

    def recording(query, *args, **kwargs):
        if queries:
            queries[0].append(query)
        return original(query, *args, **kwargs)

    return recording, queries


def _joint_queries(model, block, module, inputs, queries, perturb: int) -> tuple[torch.Tensor, int]:
    """The query ``module`` hands the attention kernel in one forward, with the block's text tokens offset by
    seeded noise when ``perturb``; and the number of text tokens."""
    found, text = [], []

    def perturb_text(block_module, args, kwargs):
        bound = inspect.signature(block_module.forward).bind(*args, **kwargs)
        context = bound.arguments["encoder_hidden_states"]
        text.append(context.shape[1])
        noise = torch.randn(context.shape, generator=torch.Generator().manual_seed(1))
        bound.arguments["encoder_hidden_states"] = context + perturb * noise
        return bound.args, bound.kwargs

    handles = [
        block.register_forward_pre_hook(perturb_text, with_kwargs=True),
        module.register_forward_pre_hook(lambda *_: queries.append(found)),
        module.register_forward_hook(lambda *_: queries.clear()),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(found) == 1, f"{type(module).__name__} called the attention kernel {len(found)} times"
    return found[0], text[0]


@pytest.mark.parametrize("name", ["flux", "ltx"])
def test_patch_size_of_packed_models_matches_the_pipeline_packing(name):
    tiny = TINY_MODELS[name]
    model = tiny.build()
    patch = patch_size(model)
    latent = torch.zeros(1, 4, 2, 8, 8)  # (batch, channels, frames, height, width)
    if name == "flux":
        packed = FluxPipeline._pack_latents(latent[:, :, 0], 1, 4, 8, 8)
    else:
        packed = LTXPipeline._pack_latents(latent, model.config.patch_size, model.config.patch_size_t)
    frames = 1 if name == "flux" else 2
    assert packed.shape[1] == math.prod((frames, 8, 8)) // math.prod(patch)


def test_patch_size_of_every_model(tiny):
    assert patch_size(tiny.build()) == PATCH[tiny.name]


def _with_rotary(tiny: TinyModel, inputs: dict, model) -> dict:
    """CogVideoX 1.5-style rotary input, which the tiny config does not use, so that its shape is checked too."""
    if tiny.name != "cogvideox":
        return inputs
    tokens = math.prod(token_grid(model, None, inputs))
    head_dim = model.config.attention_head_dim
    return {**inputs, "image_rotary_emb": (torch.ones(tokens, head_dim), torch.zeros(tokens, head_dim))}


def _build_for_arguments(tiny: TinyModel):
    if tiny.name != "cogvideox":
        return tiny.build()
    torch.manual_seed(0)
    config = dict(tiny.config, use_rotary_positional_embeddings=True)
    return tiny.model_class(**config).eval().requires_grad_(False)


def test_block_arguments_are_batch_major_shared_or_per_token_as_declared(tiny):
    model = _build_for_arguments(tiny)
    spec = spec_for(model)
    blocks = spec.block_list(model)
    batch = 3
    inputs = _with_rotary(tiny, _inputs(tiny, batch, [1, 2, 3]), model)
    alone = _with_rotary(tiny, _inputs(tiny, 1, [1]), model)
    visual = math.prod(token_grid(model, spec, inputs))
    calls = _capture(model, [block for _, block in blocks], inputs)
    calls_alone = _capture(model, [block for _, block in blocks], alone)
    for stack, block in blocks:
        arguments = calls[id(block)]
        where = f"{type(block).__name__} in {stack.path}"
        for name, value in arguments.items():
            tensors = _tensors(value)
            if name in stack.batch_major:
                assert tensors and all(t.shape[0] == batch for t in tensors), f"{where}: {name} is not batch-major"
            elif name in stack.shared:
                assert tensors, f"{where}: shared {name} has no tensor"
                for tensor, tensor_alone in zip(tensors, _tensors(calls_alone[id(block)][name]), strict=True):
                    assert tensor.shape[0] != batch and torch.equal(tensor, tensor_alone), f"{where}: {name}"
            else:
                assert not tensors, f"{where}: tensor argument {name} is neither batch-major nor shared"
        text = arguments.get("encoder_hidden_states")
        text = 0 if text is None else text.shape[1]
        for name, dim in stack.token_axes:
            for tensor in _tensors(arguments[name]):
                assert tensor.shape[dim] in (visual, visual + text), f"{where}: {name} dim {dim} {tensor.shape}"


def test_token_wise_components_treat_tokens_independently(tiny):
    model = tiny.build()
    spec = spec_for(model)
    components = [
        (stack, getattr(block, component.module))
        for stack, block in _first_blocks(model, spec)
        for component in stack.components
        if component.token_wise
    ]
    seen = _capture(model, [module for _, module in components], _inputs(tiny, 2))
    for stack, module in components:
        tokens = next(iter(seen[id(module)].values()))  # the first argument: (batch, tokens, channels)
        order = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            permuted_first, first = module(tokens[:, order]), module(tokens)
        torch.testing.assert_close(permuted_first, first[:, order], msg=f"{stack.path}: {type(module).__name__}")


def test_hand_written_components_are_completed_from_their_canonical_name():
    attention = Component(name="self_attn", module="attn1")
    assert (attention.kind, attention.attention, attention.processor_attr) == ("attention", "self", "processor")
    assert (attention.kernel, attention.heads_attr, attention.inner_dim_attr) == ("softmax", "heads", "inner_dim")
    assert attention.token_wise is False and attention.streams is None
    assert Component(name="joint_attn", module="attn").streams == "separate"
    assert Component(name="ffn", module="ff").kind == "ffn" and Component(name="ffn", module="ff").token_wise
    custom = Component(name="gate", module="gate")
    assert custom.kind is None and custom.token_wise is False
    assert Component(name="mix", module="m", attention="cross").kind == "attention"
    assert Component(name="self_attn", module="attn1") == attention

    stack = BlockStack(path="blocks", components=(attention,))
    assert (
        stack.batch_major == ("hidden_states",) and stack.shared == () and stack.token_axes == (("hidden_states", 1),)
    )
    assert ModelSpec(stacks=(stack,)).token_layout is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(name="ffn", module="ff", attention="self", kind="ffn"), "attention-only"),
        (dict(name="attn", module="attn", kind="attention"), "needs attention="),
        (dict(name="self_attn", module="attn1", streams="merged"), "joint attention only"),
        (dict(name="self_attn", module="attn1", token_wise=True), "cannot be token_wise"),
        (dict(name="x", module="x", kind="conv"), "kind must be"),
    ],
)
def test_inconsistent_components_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Component(**fields)


def test_token_layout_validation_and_errors():
    with pytest.raises(ValueError, match="exactly one"):
        TokenLayout(input="packed", text="first")
    with pytest.raises(ValueError, match="packed input only"):
        TokenLayout(input="BCHW", text="cross", packed_patch=(1, 2, 2))
    with pytest.raises(ValueError, match="text must be"):
        TokenLayout(input="BCHW", text="middle")
    pixart = TINY_MODELS["pixart"].build()
    with pytest.raises(ValueError, match="does not divide"):
        token_grid(pixart, None, (1, 4, 7, 8))
    with pytest.raises(ValueError, match="BCHW"):
        token_grid(pixart, None, (1, 4, 2, 8, 8))
    bare = ModelSpec(stacks=spec_for(pixart).stacks)
    with pytest.raises(ValueError, match="no token_layout"):
        token_grid(pixart, bare, (1, 4, 8, 8))


def test_is_flow_matching_reads_the_scheduler_then_the_family():
    assert is_flow_matching(FlowMatchEulerDiscreteScheduler())
    assert is_flow_matching(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"))
    assert not is_flow_matching(DDPMScheduler())
    assert not is_flow_matching(DPMSolverMultistepScheduler(prediction_type="v_prediction"))
    # PixArt is a noise-prediction family, but a pipeline with a flow scheduler samples a flow model.
    pixart = TINY_MODELS["pixart"].build()
    assert is_flow_matching(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=pixart))
    assert not is_flow_matching(SimpleNamespace(transformer=pixart))
    assert is_flow_matching(SimpleNamespace(transformer=TINY_MODELS["wan"].build()))
    with pytest.raises(ValueError, match="Cannot tell"):
        is_flow_matching(SimpleNamespace())
