"""Tiny, randomly initialised instances of every transformer class that has an adapter, for tests.

Each :class:`TinyModel` builds a seeded model from a small config (2 blocks per stack, widths of 16, a few dozen
tokens; one forward takes a few milliseconds on a CPU) and produces the forward arguments the real pipeline
would pass: latents in the model's layout, text embeddings, pooled projections, attention masks, rotary
inputs and the pipeline's timestep scaling.

A "prompt" is an integer seed: the text embeddings (and mask length, pooled projection, class label) of a
sample are drawn from a generator seeded by its own prompt seed, so a batch of different prompts can be compared
with each prompt run alone. ``None`` stands for the empty prompt used as the unconditional branch of
classifier-free guidance.

:func:`denoise` simulates a pipeline: an Euler flow-matching loop with CFG batched as
``torch.cat([uncond, cond])``, calling the transformer once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

#: Seed of the generator that draws the empty prompt (the unconditional branch of CFG).
EMPTY_PROMPT_SEED = 2**31 - 1

#: Seed of the model weights.
WEIGHT_SEED = 0

Prompt = int | None
Tensors = dict[str, Any]


def _no_kwargs(batch: int) -> Tensors:
    return {}


def _plain_timestep(timestep: torch.Tensor) -> Tensors:
    return {"timestep": timestep}


@dataclass(frozen=True, kw_only=True)
class TinyModel:
    """A tiny model of one adapter-supported class and the inputs its pipeline feeds it.

    Attributes:
        name: registry key, e.g. ``"flux"``.
        model_class: the diffusers transformer class.
        config: keyword arguments of ``model_class``.
        latent_shape: shape of one sample of ``hidden_states``, in the layout the forward takes.
        channel_dim: the channel axis of the batched latents; an output with more channels than the latents
            (learned sigma) is cut to the first ``latent_shape`` channels along it.
        prompt: draws the conditioning of one prompt, each tensor with a batch dimension of 1, e.g.
            ``{"encoder_hidden_states": (1, text_len, text_dim), "encoder_attention_mask": (1, text_len)}``.
        timestep_kwargs: maps the pipeline timestep ``(batch,)`` on the 0..1000 scale to the forward arguments
            the pipeline passes (scaled timestep, guidance embedding).
        static_kwargs: forward arguments that are not per sample (position ids, rotary inputs, sizes) for a
            given batch size.
    """

    name: str
    model_class: type[torch.nn.Module]
    config: Mapping[str, Any]
    latent_shape: tuple[int, ...]
    channel_dim: int = 1
    prompt: Callable[[torch.Generator, bool], Tensors]
    timestep_kwargs: Callable[[torch.Tensor], Tensors] = _plain_timestep
    static_kwargs: Callable[[int], Tensors] = field(default=_no_kwargs)

    def build(self) -> torch.nn.Module:
        """A fresh instance with seeded random weights, in eval mode, without gradients."""
        torch.manual_seed(WEIGHT_SEED)
        model = self.model_class(**self.config)
        return model.eval().requires_grad_(False)

    def latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents ``(batch, *latent_shape)``, float32."""
        return torch.randn((batch, *self.latent_shape), generator=generator)

    def conditions(self, prompt_seeds: Sequence[Prompt]) -> Tensors:
        """The per-sample forward arguments of a batch of prompts (``None`` = empty prompt), in batch order."""
        per_prompt = [self._one_prompt(seed) for seed in prompt_seeds]
        return {key: torch.cat([p[key] for p in per_prompt]) for key in per_prompt[0]}

    def inputs(
        self,
        batch: int,
        timestep: float,
        generator: torch.Generator,
        prompt_seed: Prompt | Sequence[Prompt] = 0,
    ) -> Tensors:
        """All forward arguments for ``batch`` samples at pipeline timestep ``timestep`` (0..1000 scale).

        ``prompt_seed`` is one prompt for the whole batch or a sequence of ``batch`` prompts; the latents are
        drawn from ``generator``.
        """
        if prompt_seed is None or isinstance(prompt_seed, int):
            prompt_seed = [prompt_seed] * batch
        if len(prompt_seed) != batch:
            raise ValueError(f"got {len(prompt_seed)} prompt seeds for a batch of {batch}")
        return self.forward_kwargs(
            self.latents(batch, generator), self.conditions(prompt_seed), torch.full((batch,), float(timestep))
        )

    def forward_kwargs(self, latents: torch.Tensor, conditions: Tensors, timestep: torch.Tensor) -> Tensors:
        """Assemble the forward arguments from latents, :meth:`conditions` and a ``(batch,)`` timestep."""
        return {
            "hidden_states": latents,
            **conditions,
            **self.timestep_kwargs(timestep),
            **self.static_kwargs(latents.shape[0]),
            "return_dict": False,
        }

    @staticmethod
    def output(result: Any) -> torch.Tensor:
        """The sample tensor of a forward's result (a tuple with ``return_dict=False``, else an output object)."""
        return result[0] if isinstance(result, tuple) else result.sample

    def prediction(self, result: Any, latents: torch.Tensor) -> torch.Tensor:
        """The model's prediction with the shape of ``latents`` (first half of a learned-sigma output)."""
        out = self.output(result)
        if out.shape != latents.shape:
            out = out.narrow(self.channel_dim, 0, latents.shape[self.channel_dim])
        return out

    def _one_prompt(self, seed: Prompt) -> Tensors:
        generator = torch.Generator().manual_seed(EMPTY_PROMPT_SEED if seed is None else seed)
        return self.prompt(generator, seed is None)


def _text(generator: torch.Generator, text_len: int, dim: int) -> torch.Tensor:
    return torch.randn((1, text_len, dim), generator=generator)


def _mask(generator: torch.Generator, text_len: int, empty: bool) -> torch.Tensor:
    """A T5-style padding mask ``(1, text_len)``: the empty prompt keeps 1 token, others 2..text_len."""
    valid = 1 if empty else int(torch.randint(2, text_len + 1, (1,), generator=generator))
    return (torch.arange(text_len) < valid).long()[None]


def _text_and_mask(text_dim: int, text_len: int = 8) -> Callable[[torch.Generator, bool], Tensors]:
    def prompt(generator: torch.Generator, empty: bool) -> Tensors:
        text = _text(generator, text_len, text_dim)
        return {"encoder_hidden_states": text, "encoder_attention_mask": _mask(generator, text_len, empty)}

    return prompt


def _text_only(text_dim: int, text_len: int = 8) -> Callable[[torch.Generator, bool], Tensors]:
    def prompt(generator: torch.Generator, empty: bool) -> Tensors:
        return {"encoder_hidden_states": _text(generator, text_len, text_dim)}

    return prompt


def _text_and_pooled(text_dim: int, pooled_dim: int, text_len: int = 8) -> Callable[..., Tensors]:
    def prompt(generator: torch.Generator, empty: bool) -> Tensors:
        text = _text(generator, text_len, text_dim)
        return {"encoder_hidden_states": text, "pooled_projections": torch.randn((1, pooled_dim), generator=generator)}

    return prompt


# --- PixArt-sigma: latents (B, 4, 8, 8), learned sigma doubles the output channels. ------------------------------


def _pixart_static(batch: int) -> Tensors:
    return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _integer_timestep(timestep: torch.Tensor) -> Tensors:
    # DPM-Solver / DDIM pipelines pass integer timesteps.
    return {"timestep": timestep.round().long()}


PIXART = TinyModel(
    name="pixart",
    model_class=PixArtTransformer2DModel,
    config=MappingProxyType(
        dict(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=32,
            use_additional_conditions=False,
        )
    ),
    latent_shape=(4, 8, 8),
    prompt=_text_and_mask(32),
    timestep_kwargs=_integer_timestep,
    static_kwargs=_pixart_static,
)

# --- SD3.5: block 0 has dual attention (attn2), block 1 (the last) is context_pre_only. ---------------------------

SD3 = TinyModel(
    name="sd3",
    model_class=SD3Transformer2DModel,
    config=MappingProxyType(
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
    ),
    latent_shape=(4, 8, 8),
    prompt=_text_and_pooled(32, 16),
)

# --- FLUX.1-dev: packed latents (B, 16 tokens, 4 ch * 2 * 2), timestep / 1000, guidance embedding. -----------------

_FLUX_SIDE = 4  # packed latent grid is _FLUX_SIDE x _FLUX_SIDE


def _flux_static(batch: int) -> Tensors:
    rows, cols = torch.meshgrid(torch.arange(_FLUX_SIDE), torch.arange(_FLUX_SIDE), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (seq, 3)
    return {"img_ids": img_ids, "txt_ids": torch.zeros(8, 3)}


def _flux_timestep(timestep: torch.Tensor) -> Tensors:
    return {"timestep": timestep / 1000, "guidance": torch.full_like(timestep, 3.5)}


FLUX = TinyModel(
    name="flux",
    model_class=FluxTransformer2DModel,
    config=MappingProxyType(
        dict(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
    ),
    latent_shape=(_FLUX_SIDE * _FLUX_SIDE, 16),
    channel_dim=2,
    prompt=_text_and_pooled(32, 16),
    timestep_kwargs=_flux_timestep,
    static_kwargs=_flux_static,
)

# --- Sana: latents (B, 4, 6, 6), patch size 1, caption mask. ------------------------------------------------------

SANA = TinyModel(
    name="sana",
    model_class=SanaTransformer2DModel,
    config=MappingProxyType(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=32,
            sample_size=6,
            patch_size=1,
        )
    ),
    latent_shape=(4, 6, 6),
    prompt=_text_and_mask(32),
)

# --- DiT: class-conditional; the "prompt" is a class label, the empty prompt the null class. ----------------------

_DIT_CLASSES = 10


def _dit_prompt(generator: torch.Generator, empty: bool) -> Tensors:
    label = _DIT_CLASSES if empty else int(torch.randint(0, _DIT_CLASSES, (1,), generator=generator))
    return {"class_labels": torch.tensor([label])}


DIT = TinyModel(
    name="dit",
    model_class=DiTTransformer2DModel,
    config=MappingProxyType(
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=_DIT_CLASSES,
        )
    ),
    latent_shape=(4, 8, 8),
    prompt=_dit_prompt,
    timestep_kwargs=_integer_timestep,
)

# --- Wan 2.1: video latents (B, C, F, H, W) = (B, 4, 2, 8, 8), patch (1, 2, 2). -----------------------------------

WAN = TinyModel(
    name="wan",
    model_class=WanTransformer3DModel,
    config=MappingProxyType(
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )
    ),
    latent_shape=(4, 2, 8, 8),
    prompt=_text_only(32),
)

# --- LTX-Video: packed latents (B, F*H*W = 2*4*4 tokens, 8 channels) with sizes for the rotary embedding. --------


def _ltx_static(batch: int) -> Tensors:
    # Pipeline: (vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression).
    return {"num_frames": 2, "height": 4, "width": 4, "rope_interpolation_scale": (8 / 25, 32, 32)}


LTX = TinyModel(
    name="ltx",
    model_class=LTXVideoTransformer3DModel,
    config=MappingProxyType(
        dict(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=32,
        )
    ),
    latent_shape=(2 * 4 * 4, 8),
    channel_dim=2,
    prompt=_text_and_mask(32),
    static_kwargs=_ltx_static,
)

# --- HunyuanVideo: video latents (B, 4, 2, 8, 8), guidance-distilled (guidance * 1000), text mask and pooled. -----


def _hunyuan_prompt(generator: torch.Generator, empty: bool) -> Tensors:
    tensors = _text_and_mask(32)(generator, empty)
    tensors["pooled_projections"] = torch.randn((1, 16), generator=generator)
    return tensors


def _hunyuan_timestep(timestep: torch.Tensor) -> Tensors:
    return {"timestep": timestep, "guidance": torch.full_like(timestep, 6.0) * 1000}


HUNYUAN_VIDEO = TinyModel(
    name="hunyuan_video",
    model_class=HunyuanVideoTransformer3DModel,
    config=MappingProxyType(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            text_embed_dim=32,
            pooled_projection_dim=16,
            rope_axes_dim=(2, 2, 4),
        )
    ),
    latent_shape=(4, 2, 8, 8),
    prompt=_hunyuan_prompt,
    timestep_kwargs=_hunyuan_timestep,
)

# --- CogVideoX-2b: latents (B, F, C, H, W) = (B, 2, 4, 8, 8), sincos positions, integer timesteps. ---------------

COGVIDEOX = TinyModel(
    name="cogvideox",
    model_class=CogVideoXTransformer3DModel,
    config=MappingProxyType(
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=5,
            patch_size=2,
            max_text_seq_length=8,
        )
    ),
    latent_shape=(2, 4, 8, 8),
    channel_dim=2,
    prompt=_text_only(32),
    timestep_kwargs=_integer_timestep,
)

#: Every tiny model, keyed by name; one per class with an adapter.
TINY_MODELS: dict[str, TinyModel] = {
    tiny.name: tiny for tiny in (PIXART, SD3, FLUX, SANA, DIT, WAN, LTX, HUNYUAN_VIDEO, COGVIDEOX)
}


def flow_match_timesteps(steps: int) -> torch.Tensor:
    """``steps`` decreasing pipeline timesteps from 1000 to 1, float32 ``(steps,)``."""
    return torch.linspace(1000, 1, steps)


@torch.no_grad()
def denoise(
    transformer: torch.nn.Module,
    tiny: TinyModel,
    prompt_seeds: Sequence[int],
    steps: int,
    cfg: bool,
    guidance: float = 4.0,
) -> torch.Tensor:
    """Run a simulated pipeline and return the final latents ``(len(prompt_seeds), *tiny.latent_shape)``.

    An Euler flow-matching loop over :func:`flow_match_timesteps`, calling ``transformer`` once per step. Each
    sample's initial latents are drawn from a generator seeded by its prompt seed, so a sample denoises the
    same whether it runs alone or in a batch. With ``cfg``, the batch is ``torch.cat([uncond, cond])`` as in
    the PixArt pipeline, the unconditional half using the empty prompt, and the prediction is
    ``uncond + guidance * (cond - uncond)``.
    """
    seeds = list(prompt_seeds)
    latents = torch.cat([tiny.latents(1, torch.Generator().manual_seed(seed)) for seed in seeds])
    conditions = tiny.conditions(([None] * len(seeds) if cfg else []) + seeds)
    timesteps = flow_match_timesteps(steps)
    sigmas = torch.cat([timesteps / 1000, torch.zeros(1)])
    for index, timestep in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if cfg else latents
        kwargs = tiny.forward_kwargs(model_input, conditions, timestep.expand(model_input.shape[0]))
        prediction = tiny.prediction(transformer(**kwargs), model_input)
        if cfg:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        latents = latents + (sigmas[index + 1] - sigmas[index]) * prediction
    return latents


def block_count(tiny: TinyModel) -> int:
    """How many blocks the tiny model has over all its stacks (2 per stack)."""
    config = tiny.config
    return sum(config.get(key, 0) for key in ("num_layers", "num_single_layers"))


class GraphCalls:
    """A ``torch.compile`` backend that counts the graphs it compiles and how often compiled code runs.

    Counting compiled frames proves recompiles are bounded, not that compiled code is used: a block that dynamo
    stopped compiling runs eagerly and compiles nothing. ``calls`` counts executions of the compiled graphs.
    """

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)

        return run
