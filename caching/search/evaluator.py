"""Candidate evaluation: one batched pipeline run per schedule, scored against cached full-compute outputs.

:class:`Evaluator` encodes the calibration prompts once (the text encoder never runs again), runs the
full-compute pipeline once with fixed per-prompt seeds to get the reference final latents, the per-component
feature changes and the MACs per block, and from then on scores any schedule on the first ``n`` prompts:

* cost: MACs relative to full compute (:class:`~accel.caching.search.features.CostModel`, pure), or the
  measured wall-clock time relative to the full-compute run;
* quality: PSNR of the final latents (peak = each reference sample's range) or of the decoded images
  (peak 1), averaged over prompts, against the full-compute outputs with the same seeds.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

import accel
from accel.caching.config import CacheConfig
from accel.caching.schedule import Schedule, layout_of
from accel.caching.search.features import CostModel, count_macs, record_features
from accel.eval.metrics import psnr
from accel.eval.timing import timed

logger = logging.getLogger(__name__)

#: pipelines whose ``encode_prompt`` output can be passed back as embeddings: the names of its outputs
EMBEDDING_OUTPUTS = {
    "PixArtAlphaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                            "negative_prompt_attention_mask"),
    "PixArtSigmaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                            "negative_prompt_attention_mask"),
    "SanaPipeline": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                     "negative_prompt_attention_mask"),
    "StableDiffusion3Pipeline": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                 "negative_pooled_prompt_embeds"),
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvaluatorConfig:
    """How candidates are run and scored.

    Attributes:
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        seed: prompt ``i`` starts from the noise of ``torch.Generator().manual_seed(seed + i)``.
        quality: compare final ``"latent"``s (no VAE decode per candidate) or decoded ``"image"``s.
        cost: ``"macs"`` (counted, deterministic), measured ``"latency"`` of each candidate run (noisy on shared
            machines), or ``"fitted"``: a :class:`~accel.caching.search.latency.LatencyModel` fitted once to timed
            runs (deterministic, and it sees per-call overheads that MACs miss on small models).
        sketch_size: elements kept per feature and step for the change matrices.
    """

    num_steps: int = 20
    guidance_scale: float = 4.5
    seed: int = 0
    quality: Literal["latent", "image"] = "latent"
    cost: Literal["macs", "latency", "fitted"] = "macs"
    sketch_size: int = 4096

    def __post_init__(self):
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {self.num_steps}")
        if self.quality not in ("latent", "image"):
            raise ValueError(f"quality must be 'latent' or 'image', got {self.quality!r}")
        if self.cost not in ("macs", "latency", "fitted"):
            raise ValueError(f"cost must be 'macs', 'latency' or 'fitted', got {self.cost!r}")
        if self.sketch_size < 1:
            raise ValueError(f"sketch_size must be >= 1, got {self.sketch_size}")


def _accepts(fn, name: str) -> bool:
    parameters = inspect.signature(fn).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def model_identity(pipe: Any) -> dict:
    """What identifies the model a search ran on: pipeline and transformer classes, the weights' content hash
    (:func:`accel.eval.generation.weights_checksum`, the same at any thread count) and the transformer's dtype.
    Checkpoints and the fitted latency model record it and are refused by another model."""
    from accel.eval.generation import weights_checksum

    return {
        "pipeline_class": type(pipe).__name__,
        "transformer_class": type(pipe.transformer).__name__,
        "weights": weights_checksum(pipe),
        "dtype": str(getattr(pipe.transformer, "dtype", "")).removeprefix("torch."),
    }


class Evaluator:
    """Scores schedules on one pipeline and prompt set; see the module docstring.

    Args:
        pipe: a diffusers pipeline with a supported transformer.
        prompts: calibration prompts (all run in one batch).
        config: an :class:`EvaluatorConfig`.
        call_kwargs: extra pipeline arguments (e.g. ``max_sequence_length``); only those the pipeline takes.
    """

    def __init__(self, pipe: Any, prompts: list[str], config: EvaluatorConfig, call_kwargs: dict | None = None):
        if not prompts:
            raise ValueError("the search needs at least one calibration prompt")
        from accel.api import denoisers

        others = [name for name in denoisers(pipe) if name != "transformer"]
        if others:
            raise ValueError(
                f"{type(pipe).__name__} has more denoisers ({', '.join(others)}) than `transformer`; the search "
                "calibrates and scores one denoiser, so it cannot search this pipeline yet (accel.apply caches all)"
            )
        self.pipe, self.prompts, self.config = pipe, list(prompts), config
        self.layout = layout_of(pipe)
        self.model_identity = model_identity(pipe)
        call = type(pipe).__call__
        defaults = {"clean_caption": False, "use_resolution_binning": False, **(call_kwargs or {})}
        self.call_kwargs = {k: v for k, v in defaults.items() if _accepts(call, k)}
        self.embeddings = self._encode()
        with record_features(pipe.transformer, self.layout.components, config.sketch_size, config.seed) as recorder:
            self.reference, self.full_seconds = timed(lambda: self.generate(None, len(self.prompts)))
        if config.cost == "latency":  # time without the recording hooks
            _, self.full_seconds = timed(lambda: self.generate(None, len(self.prompts)))
        self.change = recorder.change_matrices()
        args, kwargs = recorder.first_call
        self.cost_model: CostModel = count_macs(pipe.transformer, self.layout.components, args, kwargs)
        self._reference_images: torch.Tensor | None = None
        self.latency_model = None  # a LatencyModel, set by the search when config.cost == "fitted"
        logger.info(
            "calibrated on %d prompts: full compute %.2f s, %.3f GMACs per transformer call",
            len(self.prompts), self.full_seconds, self.cost_model.call_macs / 1e9,
        )  # fmt: skip

    # -- running -----------------------------------------------------------------------------------------

    def _encode(self) -> dict | None:
        names = EMBEDDING_OUTPUTS.get(type(self.pipe).__name__)
        if names is None:
            logger.info("%s: prompts are re-encoded at every run", type(self.pipe).__name__)
            return None
        kwargs = {"do_classifier_free_guidance": self.config.guidance_scale > 1}
        for key in ("prompt_2", "prompt_3"):
            if _accepts(self.pipe.encode_prompt, key):
                kwargs[key] = None
        for key in ("max_sequence_length", "clean_caption"):
            if key in self.call_kwargs and _accepts(self.pipe.encode_prompt, key):
                kwargs[key] = self.call_kwargs[key]
        with torch.no_grad():
            outputs = self.pipe.encode_prompt(self.prompts, **kwargs)
        return {name: value for name, value in zip(names, outputs) if value is not None}

    def _inputs(self, n: int, start: int = 0) -> dict:
        if self.embeddings is None:
            return {"prompt": self.prompts[start : start + n]}
        inputs = {name: value[start : start + n] for name, value in self.embeddings.items()}
        if _accepts(type(self.pipe).__call__, "negative_prompt"):
            inputs["negative_prompt"] = None
        return inputs

    @torch.no_grad()
    def generate(self, schedule: Schedule | None, n: int, start: int = 0, seed: int | None = None) -> torch.Tensor:
        """Final latents ``(n, ...)`` of prompts ``start .. start + n - 1``, prompt ``i`` from the noise of seed
        ``seed + i`` (default ``config.seed``), full compute when ``schedule`` is None."""
        first = self.config.seed if seed is None else seed
        generators = [torch.Generator().manual_seed(first + i) for i in range(start, start + n)]
        kwargs = dict(
            num_inference_steps=self.config.num_steps,
            guidance_scale=self.config.guidance_scale,
            generator=generators,
            output_type="latent",
            **self._inputs(n, start),
            **self.call_kwargs,
        )
        if schedule is None:
            return self.pipe(**kwargs).images
        with accel.apply(self.pipe, CacheConfig(schedule=schedule, count_macs=False)):
            return self.pipe(**kwargs).images

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]``, ``(batch, 3, height, width)``, as the pipeline's VAE and post-processing give."""
        vae = self.pipe.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            scaled = scaled + shift
        image = vae.decode(scaled, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def reference_images(self, n: int) -> torch.Tensor:
        """Decoded full-compute images of the first ``n`` prompts (decoded once, cached)."""
        if self._reference_images is None:
            self._reference_images = self.decode(self.reference)
        return self._reference_images[:n]

    # -- scoring -----------------------------------------------------------------------------------------

    def latent_psnr(self, latents: torch.Tensor) -> float:
        """Mean PSNR of ``latents`` vs the reference latents of the same prompts."""
        reference = self.reference[: len(latents)]
        peak = reference.flatten(1).amax(1) - reference.flatten(1).amin(1)
        return float(psnr(latents, reference, peak).mean())

    def image_psnr(self, latents: torch.Tensor) -> float:
        """Mean PSNR of the decoded ``latents`` vs the decoded reference."""
        return float(psnr(self.decode(latents), self.reference_images(len(latents)), 1.0).mean())

    def measure(self, schedule: Schedule, n: int | None = None, images: bool = False) -> dict:
        """Metrics of ``schedule`` on the first ``n`` prompts (default all).

        Returns:
            ``{"psnr", "relative_macs", "ideal_speedup", "relative_seconds", "prompts"}`` and, with
            ``images`` (or image quality), ``"image_psnr"``; ``"psnr"`` is the search's quality measure.
        """
        n = len(self.prompts) if n is None else n
        if schedule.num_steps != self.config.num_steps:
            schedule = schedule.resample(self.config.num_steps)
        latents, seconds = timed(lambda: self.generate(schedule, n))
        relative = self.cost_model.relative_macs(schedule.mask)
        metrics = {
            "latent_psnr": self.latent_psnr(latents),
            "relative_macs": relative,
            "ideal_speedup": 1.0 / relative,
            "relative_seconds": seconds / (self.full_seconds * n / len(self.prompts)),
            "prompts": n,
        }
        if self.latency_model is not None:
            metrics["fitted_relative_seconds"] = self.latency_model.relative(schedule.mask, schedule.forecast_order)
            metrics["predicted_speedup"] = 1.0 / metrics["fitted_relative_seconds"]
        if images or self.config.quality == "image":
            metrics["image_psnr"] = self.image_psnr(latents)
        metrics["psnr"] = metrics["image_psnr" if self.config.quality == "image" else "latent_psnr"]
        return metrics

    def objectives(self, metrics: dict) -> np.ndarray:
        """``(cost, -psnr)``, both minimised."""
        key = {"macs": "relative_macs", "latency": "relative_seconds", "fitted": "fitted_relative_seconds"}
        cost = metrics[key[self.config.cost]]
        return np.array([cost, -metrics["psnr"]], dtype=np.float64)
