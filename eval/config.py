"""What an evaluation run does, as one frozen config, and the CLI flags derived from it.

:class:`EvalConfig` holds every setting; ``accel eval`` builds its flags from the config's fields (their
``metadata["help"]``) with :func:`add_config_arguments` (:mod:`accel.flags`, one style for every subcommand)
and reads them back with :func:`config_from_args`, so
a setting added here appears on the command line by itself. ``--config FILE.json`` loads the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from dataclasses import dataclass, field

from accel import flags
from accel.eval.cost import TimingConfig
from accel.eval.methods import parse_methods
from accel.eval.metrics import METRICS, MetricWeights
from accel.eval.runtime import RuntimeConfig
from accel.flags import parse_bool  # noqa: F401 (re-exported)
from accel.textconfig import read_prompts  # noqa: F401 (re-exported)

#: prompts of ``accel demo``: emoji names from the bundled model's dataset (13 of its training captions, 3 held out)
BUILTIN_PROMPTS = (
    "grinning face",
    "red apple",
    "cat face",
    "sun with face",
    "pile of poo",
    "ghost",
    "rocket",
    "four leaf clover",
    "slice of pizza",
    "heavy black heart",
    "dog face",
    "snowman",
    "hot beverage",
    "crescent moon",
    "smiling face with sunglasses",
    "tangerine",
)

#: prompts of ``accel demo --video``: captions of the bundled video model's training clips (an emoji and a motion)
BUILTIN_VIDEO_PROMPTS = (
    "red apple sliding to the right",
    "cat face zooming in",
    "rocket sliding up",
    "ghost rotating clockwise",
)

#: methods of ``accel demo --video`` (a few, so it takes a few minutes on a CPU)
DEFAULT_VIDEO_METHODS = ("full", "steps-10", "fora-2", "fora-3", "taylorseer-3")

DEFAULT_METHODS = (
    "full",
    "steps-10",
    "fora-2",
    "fora-3",
    "taylorseer-3",
    "front@2",
    "delta-dit",
    "tgate",
    "fbc-0.08",
    "diffusers-pab",
    "diffusers-fbc-0.08",
)


def _help(text: str) -> dict:
    return {"help": text}


#: the default of ``--steps`` wherever a pipeline is loaded (eval, demo, generate, search), for its help
STEPS_DEFAULT_HELP = (
    "omitted: the pipeline's own default (its __call__'s num_inference_steps: 28 for SD3 and FLUX (FLUX.1-schnell "
    "too: pass 4 there), 50 for Wan, 20 for PixArt and the bundled models)"
)


def check_size(height: int | None, width: int | None) -> dict:
    """``{"height": ..., "width": ...}`` of the ones given, as pipeline call arguments.

    Raises:
        ValueError: a size that is not a positive integer.
    """
    size = {name: value for name, value in (("height", height), ("width", width)) if value is not None}
    for name, value in size.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    return size


#: metadata of a config's ``runtime: RuntimeConfig`` field: its flags are ``--device``, ``--dtype``, ``--compile``
RUNTIME_FIELD = {"prefix": False}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation: which model, methods, prompts and metrics, and how to time them."""

    model: str | None = field(
        default=None,
        metadata=_help("pipeline folder or hub id; bundled-video: the bundled video model; omitted: the bundled model"),
    )
    methods: tuple[str, ...] = field(
        default=DEFAULT_METHODS, metadata=_help("comma-separated methods (see `accel eval --list-methods`)")
    )
    prompts: tuple[str, ...] = field(default=BUILTIN_PROMPTS, metadata={"cli": False})
    prompts_source: str = field(default="built-in", metadata={"cli": False})
    seed: int = field(default=0, metadata=_help("sample i is generated with seed + i"))
    steps: int | None = field(
        default=None, metadata=_help(f"denoising steps of the full-compute reference; {STEPS_DEFAULT_HELP}")
    )
    height: int | None = field(default=None, metadata=_help("image (or clip) height in pixels; omitted: the model's"))
    width: int | None = field(default=None, metadata=_help("image (or clip) width in pixels; omitted: the model's"))
    guidance_scale: float | None = field(
        default=None, metadata=_help("classifier-free guidance scale; omitted: the model's (4.0 bundled, 4.5 PixArt)")
    )
    batch_size: int = field(default=4, metadata=_help("prompts per pipeline call while generating"))
    noise_seed_sets: int = field(
        default=0,
        metadata=_help(
            "also run full compute with this many other seed sets: the spread of FID and the prompt score over "
            "them is their run-to-run noise (0: not measured)"
        ),
    )
    metrics: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            f"comma-separated metric keys ({', '.join(METRICS)}); omitted: every one that scores the pipeline's "
            "output (images, or video clips: motion is for clips only)"
        ),
    )
    real_images: str | None = field(
        default=None,
        metadata=_help(
            "FID/KID reference set (.npz with 'images' or a folder; for a video pipeline, images its clips' frames "
            "are compared with); default: full-compute"
        ),
    )
    pipeline_kwargs: dict = field(default_factory=dict, metadata=_help("extra pipeline call arguments, as JSON"))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata=RUNTIME_FIELD)
    threads: int | None = field(
        default=None, metadata=_help("torch.set_num_threads for the run (CPU); omitted: torch's default")
    )
    timing: TimingConfig = field(default_factory=TimingConfig)
    weights: MetricWeights = field(default_factory=MetricWeights)

    def __post_init__(self):
        parse_methods(self.methods)  # raises with the valid forms
        if not self.prompts:
            raise ValueError("no prompts")
        if (self.steps is not None and self.steps < 1) or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        check_size(self.height, self.width)
        unknown = [m for m in self.metrics or () if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        if self.noise_seed_sets < 0:
            raise ValueError(f"noise_seed_sets must be >= 0, got {self.noise_seed_sets}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "pipeline_kwargs", dict(self.pipeline_kwargs))

    @property
    def call_overrides(self) -> dict:
        """Pipeline call arguments given: :attr:`pipeline_kwargs` with :attr:`height` and :attr:`width`."""
        return {**self.pipeline_kwargs, **check_size(self.height, self.width)}

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per prompt."""
        return tuple(self.seed + i for i in range(len(self.prompts)))

    @property
    def prompts_sha256(self) -> str:
        """Hash of the prompt list (one prompt per line)."""
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


# -- flags from the dataclass (accel.flags) ------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = EvalConfig, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls``, nested configs as ``--timing-repeats``
    (:func:`accel.flags.add_config_arguments`)."""
    flags.add_config_arguments(parser, cls, skip=skip)


def config_from_args(args: argparse.Namespace, base: dict | None = None, cls: type = EvalConfig):
    """A ``cls`` config (an :class:`EvalConfig` by default) from ``base`` (e.g. a ``--config`` file) overridden by
    the flags given."""
    return flags.config_from_args(args, cls, base)


def build_config(values: dict, cls: type = EvalConfig):
    """A config from plain JSON values (lists become tuples, nested dicts nested configs)."""
    return flags.build_config(values, cls)


#: :class:`RuntimeConfig` fields that only :meth:`RuntimeConfig.load_pipeline` reads: a command that loads its
#: model otherwise leaves their flags out rather than ignore them
LOADING_FIELDS = ("variant", "revision", "offload")


def add_runtime_arguments(parser: argparse.ArgumentParser, loading: bool = True) -> None:
    """``--device``, ``--dtype``, ``--compile`` and (with ``loading``) ``--variant``, ``--revision`` and
    ``--offload``, for a command whose config has no ``runtime`` field."""
    add_config_arguments(parser, RuntimeConfig, skip=() if loading else LOADING_FIELDS)


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The :class:`~accel.eval.runtime.RuntimeConfig` of :func:`add_runtime_arguments`' flags."""
    return config_from_args(args, cls=RuntimeConfig)
