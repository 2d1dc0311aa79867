"""The quantization schemes and their torchao configs: what runs a quantized ``nn.Linear``.

Each scheme maps to one torchao config applied with ``torchao.quantization.quantize_``:

* ``"int8-weight"``: ``Int8WeightOnlyConfig``: int8 weights with one scale per output channel, activations in
  the model's dtype (memory; speed where the matmul is memory-bound);
* ``"int8-dynamic"``: ``Int8DynamicActivationInt8WeightConfig``: int8 weights per output channel and int8
  activations quantized per token at run time (W8A8 integer matmuls);
* ``"int8-static"``: ``Int8StaticActivationInt8WeightConfig``: int8 weights per output channel and int8
  activations with one scale per layer fixed by calibration (W8A8 with no run-time range reduction). The scale
  is the largest activation magnitude the layer saw along the calibration trajectories, so this is the scheme
  where *which* trajectory calibration follows (cached or not) decides the result;
* ``"fp8"``: ``Float8DynamicActivationFloat8WeightConfig`` with per-row scales: float8 e4m3 weights and
  activations (needs a GPU with float8 matmuls: CUDA compute capability 8.9 or newer).

torchao is imported lazily: a missing one raises an ``ImportError`` naming the extra to install. The configs are
built with ``set_inductor_config=False`` so that quantizing never changes inductor's global settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Scheme = Literal["int8-weight", "int8-dynamic", "int8-static", "fp8"]

#: every scheme :class:`~accel.quant.QuantConfig` accepts
SCHEMES: tuple[str, ...] = ("int8-weight", "int8-dynamic", "int8-static", "fp8")

#: the schemes whose activation scales come from calibration (a plan holds them)
STATIC_SCHEMES: tuple[str, ...] = ("int8-static",)

#: the largest int8 magnitude of the symmetric activation grid
INT8_MAX = 127

#: what a layer left in the model's own precision is called in plans and stats
FULL_PRECISION = "full"

#: the CUDA compute capability float8 matmuls need (Ada, Hopper and newer)
FP8_CAPABILITY = (8, 9)


def torchao_quantization() -> Any:
    """The ``torchao.quantization`` module; an ``ImportError`` naming the ``quant`` extra if torchao is missing."""
    try:
        import torchao.quantization as quantization
    except ImportError as error:  # pragma: no cover - exercised only without torchao
        raise ImportError(
            "accel.quant needs torchao: pip install 'diffusers-accel[quant]' (or pip install torchao)"
        ) from error
    return quantization


@dataclass(frozen=True)
class ActivationRange:
    """What a static scheme needs to know of a layer's inputs: their largest magnitude along the calibration
    trajectories and their number of dimensions (torchao's static scale has the activation's shape rank)."""

    absmax: float
    ndim: int

    @property
    def scale(self) -> float:
        """The symmetric int8 scale ``absmax / 127`` (a tiny floor keeps an all-zero input representable)."""
        return max(self.absmax, 1e-12) / INT8_MAX

    def to_list(self) -> list:
        """``[absmax, ndim]``, as plans store it."""
        return [self.absmax, self.ndim]


def torchao_config(scheme: str, activation: ActivationRange | None = None) -> Any:
    """The torchao config that implements ``scheme`` (see the module docstring); a static scheme needs the
    layer's calibrated ``activation`` range."""
    quantization = torchao_quantization()
    if scheme == "int8-weight":
        return quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int8-dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme == "int8-static":
        if activation is None:
            raise ValueError("scheme 'int8-static' needs each layer's calibrated activation range (a plan)")
        scale = torch.tensor(activation.scale, dtype=torch.float32).reshape([1] * activation.ndim)
        return quantization.Int8StaticActivationInt8WeightConfig(
            act_quant_scale=scale,
            granularity=[quantization.PerTensor(), quantization.PerRow()],
            set_inductor_config=False,
        )
    if scheme == "fp8":
        return quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=quantization.PerRow(), set_inductor_config=False
        )
    raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")


def check_scheme(scheme: str, device: torch.device | str) -> None:
    """Raise a ``RuntimeError`` naming what ``scheme`` needs when it cannot run on ``device``.

    ``"fp8"`` needs a CUDA GPU of compute capability 8.9 or newer (float8 tensor-core matmuls); the int8 schemes
    run everywhere torchao does (CPU and GPU).
    """
    device = torch.device(device)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")
    if scheme != "fp8":
        return
    if device.type != "cuda":
        raise RuntimeError(
            f"quantization scheme 'fp8' needs a CUDA GPU with compute capability >= "
            f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Ada or Hopper: float8 matmuls); the transformer is on "
            f"{device.type}. Use 'int8-dynamic' or 'int8-weight' here."
        )
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_CAPABILITY:
        raise RuntimeError(
            f"quantization scheme 'fp8' needs CUDA compute capability >= {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} "
            f"(float8 matmuls); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
            "Use 'int8-dynamic' or 'int8-weight' on this GPU."
        )


def quantized_weight(
    linear: torch.nn.Linear, scheme: str, activation: ActivationRange | None = None
) -> torch.nn.Parameter:
    """A new weight ``Parameter`` (a torchao quantized tensor) for ``linear`` under ``scheme`` (a static scheme
    with the layer's calibrated ``activation`` range).

    ``linear`` itself is not changed: torchao's ``quantize_`` runs on a stand-in ``Linear`` that holds the same
    weight, and its new parameter is returned, for the caller to put in place through its patch log.
    """
    quantization = torchao_quantization()
    stand_in = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    stand_in.weight = torch.nn.Parameter(linear.weight.detach(), requires_grad=False)
    quantization.quantize_(stand_in, torchao_config(scheme, activation))
    return stand_in.weight


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a plain tensor's ``numel * element_size``; a tensor subclass (a torchao quantized
    weight) the sum over the inner tensors it is made of (int8 data and scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The float values a (possibly quantized) weight stands for, in float32."""
    if hasattr(weight, "dequantize") and type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return weight.dequantize().float()
    return weight.detach().float()


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(reference^2) / sum((reference - approx)^2))``;
    ``inf`` when they are equal."""
    reference, approximation = reference.double(), approximation.double()
    noise = (reference - approximation).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
