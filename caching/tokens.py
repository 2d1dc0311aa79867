"""Per-token step allocation for flow-matching DiTs: :class:`TokenStepConfig` and its handle.

Full inference gives every visual token the same number of denoising steps. Here each sample (each batch row,
each classifier-free-guidance branch) computes, at a sparse step, only its active tokens, chosen from its own
velocity dynamics (:mod:`accel.caching.token_select`); an inactive token's velocity is its cached one, so the
scheduler advances it with its own update (Euler for a flow-matching Euler scheduler) on the cached velocity, and
no model evaluation. How it runs:

* a budget below ``min_active`` first coarsens the scheduler's grid (fewer steps for every token), so the
  steps that remain compute at least that share of the tokens on average;
* at every transformer call, eagerly and outside compiled code, the handle picks each row's active tokens:
  every token at the leading dense steps (``dense_steps``, or ``dense_share`` of the grid) and the reset
  points, else a bucketed count (:func:`~accel.caching.token_select.active_count`) of each row's highest scores;
* the first block gathers the active tokens of ``hidden_states`` (and of the arguments the adapter says run
  over the tokens, e.g. Wan's rotary embedding, so positions stay right); every block runs on
  ``(rows, active, width)``: the linear, norm and feed-forward cost shrink with the count; modulation is per
  sample and broadcasts; the last block scatters the result back;
* self-attention (:mod:`accel.caching.token_attention`) lets the active queries see every key and value:
  current ones for the active tokens, the per-layer cache of their last computed step for the others; in
  MMDiT models (SD3, FLUX: :mod:`accel.caching.token_joint`) the text is computed at every step and the joint
  attention runs over the text and every image token the same way;
* the output projection's per-token result is kept for the computed tokens and replaced by the cached velocity
  for the others.

Everything goes through the patch log (block and projection wraps, self-attention processors), so
``remove()`` restores the model exactly. Under ``torch.compile`` the blocks see a handful of token counts
(the buckets), so recompiles are bounded.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import numpy as np
import torch

from accel.api import Handle, Target, register
from accel.caching.notices import SaidOnce
from accel.caching.policy import same_halves
from accel.caching.token_allocation import TokenBranch, TokenSelection
from accel.caching.token_attention import ActiveTokens, token_processor_for
from accel.caching.token_checks import check_applies
from accel.caching.token_config import TokenStepConfig, TokenStepStats, is_count, ras_config
from accel.caching.token_features import TokenFeatures
from accel.caching.token_select import TokenHistory
from accel.geometry import token_grid
from accel.patches import eager

logger = logging.getLogger(__name__)

__all__ = ["TokenStepConfig", "TokenStepHandle", "TokenStepStats", "apply_token_steps", "ras_config"]


class TokenStepHandle(TokenSelection, Handle):
    """Handle of :class:`TokenStepConfig`; see the module docstring."""

    def __init__(self, target: Target, config: TokenStepConfig):
        super().__init__("token_steps")
        self.target, self.config = target, config
        check_applies(target, config)
        model = target.transformer
        self.blocks = [(stack, block) for stack, block in target.spec.block_list(model)]
        self.active = ActiveTokens()
        layers = []
        for stack, block in self.blocks:
            positions = [name for name, dim in stack.token_axes if name != "hidden_states" and dim != 1]
            for component in _self_attention(target, block):
                attn = getattr(block, component.module)
                original = getattr(attn, component.processor_attr)
                processor = token_processor_for(attn, original, self.active, len(layers))
                if positions and not getattr(processor, "gathers_positions", False):
                    raise ValueError(
                        f"per-token steps: {type(model).__name__}'s {positions} run over the tokens along another "
                        f"dimension than 1 and {type(original).__name__}'s replacement does not gather them"
                    )
                width = int(getattr(attn, component.inner_dim_attr))
                heads = int(getattr(attn, component.heads_attr))
                layers.append((attn, component.processor_attr, processor, heads, width // heads))
        if not layers:
            raise ValueError(f"{type(model).__name__} has no self-attention component for per-token steps")
        self._geometry = [(heads, dim) for *_, heads, dim in layers]
        self._params = [list(inspect.signature(block.forward).parameters) for _, block in self.blocks]
        self._timestep_position = _position(model, target.spec.timestep_arg)
        self._branches: dict[int, TokenBranch] = {}
        self._call: dict[str, Any] = {}
        self._fractions: dict[int, list[float]] = {}
        self._ras_index: tuple[int, torch.Tensor] | None = None
        self._shared: tuple[int, torch.Tensor] | None = None
        self._first_input: tuple[int, Any] | None = None
        self._paired_calls = False
        self._grid: tuple[int, int, int] | None = None
        for attn, attr, processor, *_ in layers:
            self.patch_log.set_processor(attn, processor, attr)
        for position, (_, block) in enumerate(self.blocks):
            self.patch_log.wrap_call(block, self._block_wrapper(position))
        self.patch_log.wrap_call(model.proj_out, self._projection)
        self._requested: int | None = None  # the step count the pipeline asked its scheduler for
        self._notices = SaidOnce(logger)
        scheduler = getattr(target.pipeline, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            self.patch_log.wrap(scheduler, "set_timesteps", self._set_timesteps)
        else:
            self._bare_transformer_notices()
        target.tracker.add_call_listener(self._on_call)
        target.tracker.add_reset_listener(self.reset)

    def _bare_transformer_notices(self) -> None:
        """What a bare transformer (no scheduler to wrap) cannot do with the config, said at apply."""
        config = self.config
        if config.fraction < config.min_active:
            self._notices.once(
                "bare-transformer",
                logging.WARNING,
                f"TokenStepConfig(budget={config.fraction:g}) is below min_active={config.min_active:g}, but a bare "
                "transformer has no scheduler to coarsen: the budget is spent on every step it is called at",
            )
        if config.reset_points:
            self._notices.once(
                "bare-resets",
                logging.WARNING,
                f"TokenStepConfig(reset_points={config.reset_points}) needs the step count, which a bare transformer "
                "does not know: only the first dense_steps compute every token; apply to the pipeline instead",
            )

    @property
    def _grid_budget(self) -> float:
        """The budget on the grid the current trajectory runs (see :meth:`TokenStepConfig.grid_fraction`)."""
        requested = self._requested
        return self.config.grid_fraction(requested) if requested else self.config.fraction

    def _set_timesteps(self, inner, *args, **kwargs):
        """The scheduler's ``set_timesteps`` on the grid of :meth:`TokenStepConfig.grid_steps`: a step count
        becomes the coarse count, explicit ``sigmas``/``timesteps`` are resampled to that many points over the
        same range."""
        args, kwargs, requested = list(args), dict(kwargs), None
        explicit = [name for name in ("sigmas", "timesteps") if kwargs.get(name) is not None]
        if explicit:
            requested = len(kwargs[explicit[0]])
        elif args and is_count(args[0]):
            requested = int(args[0])
        elif is_count(kwargs.get("num_inference_steps")):
            requested = int(kwargs["num_inference_steps"])
        config = self.config
        grid = config.grid_steps(requested) if requested else None
        self._requested = requested
        if grid is not None:
            self._check_dense(requested, grid)
        if grid is None or grid == requested:
            return inner(*args, **kwargs)
        for name in explicit:
            kwargs[name] = _resample(kwargs[name], grid)
        if args and is_count(args[0]):
            args[0] = grid
        elif kwargs.get("num_inference_steps") is not None:
            kwargs["num_inference_steps"] = grid
        self._notices.once(
            f"grid-{requested}",
            logging.WARNING,
            f"TokenStepConfig(budget={config.fraction:g}) is below min_active={config.min_active:g}: the pipeline's "
            f"{requested} steps run on a grid of {grid}, each computing {self._grid_budget:.2f} of the tokens on "
            "average (min_active=0 keeps every step)",
        )
        return inner(*args, **kwargs)

    def _check_dense(self, requested: int, grid: int) -> None:
        """Say when the dense steps leave no token to skip, or alone compute more than the budget."""
        config, dense = self.config, self.config.dense_count(grid)
        if dense >= grid:
            self._notices.once(
                f"all-dense-{requested}",
                logging.WARNING,
                f"TokenStepConfig(budget={config.fraction:g}): every step of the {grid}-step grid computes every "
                f"token (dense_steps={config.dense_steps}, dense_share={config.dense_share:g}, "
                f"reset_points={config.reset_points}): no token is skipped, this is {grid} plain steps",
            )
        elif dense / requested > config.fraction + 1e-9:
            self._notices.once(
                f"dense-over-budget-{requested}",
                logging.WARNING,
                f"TokenStepConfig(budget={config.fraction:g}): the {dense} dense steps of the {grid}-step grid alone "
                f"compute {dense / requested:.2f} of the token-steps of {requested} steps, more than the budget",
            )

    # -- per call, eagerly ---------------------------------------------------------------------------------

    def _on_call(self, args: tuple, kwargs: dict) -> None:
        name = self.target.spec.timestep_arg
        position = self._timestep_position
        timestep = kwargs.get(name, args[position] if position is not None and position < len(args) else None)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._call = {"timestep": timestep}
        if isinstance(hidden, torch.Tensor):
            self._call["halves"] = bool(same_halves(hidden))
            self._call["input"] = hidden
            inputs = {**kwargs, "hidden_states": hidden}
            self._grid = tuple(token_grid(self.target.transformer, self.target.spec, inputs))

    @eager
    def _begin(self, hidden: torch.Tensor) -> None:
        """Pick this call's active tokens and point the processors at the branch's caches."""
        context = self.target.tracker.current
        rows, tokens = hidden.shape[:2]
        branch = self._branches.get(context.branch)
        if branch is None or (branch.rows, branch.tokens) != (rows, tokens):
            branch = self._branches[context.branch] = TokenBranch(rows, tokens)
        if not branch.caches:
            branch.caches = [
                tuple(hidden.new_zeros(rows, tokens, heads, dim) for _ in range(2)) for heads, dim in self._geometry
            ]
        self._track_branches(context)
        time = _times(self._call.get("timestep"), rows, hidden.device)
        index = self._index(branch, context, time, hidden.device)
        mask = torch.zeros(rows, tokens, dtype=torch.bool, device=hidden.device).scatter_(1, index, True)
        self._call.update(branch=branch, index=index, mask=mask, time=time, step=context.step)
        self._fractions.setdefault(context.step, []).append(index.shape[1] / tokens)
        self.active.index, self.active.caches, self.active.tokens = index, branch.caches, tokens

    def _track_branches(self, context) -> None:
        """Whether later calls of a step take the latents of its first call (CFG in separate calls)."""
        latents = self._call.get("input")
        if context.branch == 0:
            self._first_input = (context.step, latents)
        elif self._first_input and self._first_input[0] == context.step and isinstance(latents, torch.Tensor):
            first = self._first_input[1]
            self._paired_calls = first.shape == latents.shape and torch.equal(first, latents)

    def _gather_argument(self, value: Any, index: torch.Tensor) -> Any:
        if isinstance(value, tuple):
            return tuple(self._gather_argument(v, index) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        cache = self._call.setdefault("gathered", {})
        key = id(value)
        if key not in cache:
            rows = index.shape[0]
            if value.shape[0] == 1:  # shared by every sample: each row takes its own tokens' entries
                cache[key] = (value, value[0][index])
            else:  # (rows, tokens, ...)
                cache[key] = (value, value[torch.arange(rows, device=index.device)[:, None], index])
        return cache[key][1]

    def _block_wrapper(self, position: int):
        first, last = position == 0, position == len(self.blocks) - 1
        stack, _ = self.blocks[position]
        params = self._params[position]
        axes = [name for name, dim in stack.token_axes if name != "hidden_states" and dim == 1]
        output = stack.outputs.index("hidden_states")

        def wrapper(inner, *args, **kwargs):
            if self.target.tracker.current is None:
                return inner(*args, **kwargs)
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if first:
                self._begin(hidden)
                self._call["full"] = hidden
                hidden = _gather_rows(hidden, self._call["index"])
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            for name in axes:
                where = params.index(name) if name in params else None
                if where is not None and where < len(args):
                    args[where] = self._gather_argument(args[where], self._call["index"])
                elif name in kwargs:
                    kwargs[name] = self._gather_argument(kwargs[name], self._call["index"])
            out = inner(*args, **kwargs)
            if last:
                full, index = self._call["full"], self._call["index"]
                result = out[output] if isinstance(out, tuple) else out
                result = full.scatter(1, index[..., None].expand(*index.shape, full.shape[-1]), result.to(full.dtype))
                out = (*out[:output], result, *out[output + 1 :]) if isinstance(out, tuple) else result
            return out

        return wrapper

    def _projection(self, inner, hidden: torch.Tensor, *args, **kwargs):
        out = inner(hidden, *args, **kwargs)
        call = self._call
        if self.target.tracker.current is None or "mask" not in call:
            return out
        branch: TokenBranch = call["branch"]
        if branch.history is None:
            branch.history = TokenHistory.start(out, call["time"], self.target.tracker.num_steps)
            result = branch.history.last
        else:
            result = branch.history.update(out, call["mask"], call["time"])
        self._call = {}
        self.active.index = None
        return result.clone()

    # -- public ----------------------------------------------------------------------------------------------

    def token_features(self) -> TokenFeatures | None:
        """The tokens the blocks of the current transformer call see (for block caching underneath), or None
        outside a call."""
        index = self.active.index
        if index is None:
            return None
        return TokenFeatures(index, self.active.tokens, text_first=self.target.spec.token_layout.text == "first")

    def stats(self) -> TokenStepStats:
        """Active fraction per step, token-steps computed and per-token heat maps; see :class:`TokenStepStats`."""
        steps = [sum(v) / len(v) for _, v in sorted(self._fractions.items())]
        maps = []
        for _, branch in sorted(self._branches.items()):
            if branch.history is None:
                continue
            counts = branch.history.computed.detach().cpu()
            grid = self._grid if self._grid and math.prod(self._grid) == branch.tokens else (1, 1, branch.tokens)
            maps.append(counts.view(branch.rows, *grid))
        requested = self._requested or len(steps)
        return TokenStepStats(
            active=tuple(steps),
            token_steps=sum(steps) / requested if steps else 1.0,
            steps=(requested, len(steps)),
            heat_maps=tuple(maps),
            grid=self._grid,
        )

    def reset(self) -> None:
        """Drop the histories, caches and counts: the next call starts a trajectory."""
        self._branches.clear()  # the current call's own data (from the call listener, which runs first) stays
        self._fractions.clear()
        self._ras_index = self._shared = self._first_input = None
        self._paired_calls = False

    def _remove(self) -> None:
        self.target.tracker.remove_call_listener(self._on_call)
        self.target.tracker.remove_reset_listener(self.reset)
        for branch in self._branches.values():  # the attention caches go; the last trajectory's stats stay
            branch.caches = []
        self._call = {}
        self.active.index, self.active.caches = None, []
        super()._remove()


def _resample(values, count: int):
    """``count`` points spread evenly over ``values`` (a list, array or tensor of sigmas or timesteps), linearly
    interpolated, the first and last kept; integer timesteps stay integers, the container type stays."""
    source = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    positions = np.linspace(0, len(source) - 1, count)
    resampled = np.interp(positions, np.arange(len(source)), source.astype(np.float64))
    if np.issubdtype(source.dtype, np.integer):
        resampled = np.round(resampled)
    resampled = resampled.astype(source.dtype)
    if isinstance(values, torch.Tensor):
        return torch.as_tensor(resampled, device=values.device)
    return resampled.tolist() if isinstance(values, list) else resampled


def _gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(rows, tokens, width)`` -> ``(rows, active, width)`` at ``index: (rows, active)``."""
    return hidden.gather(1, index[..., None].expand(*index.shape, hidden.shape[-1]))


def _times(timestep: Any, rows: int, device) -> torch.Tensor:
    """``(rows,)`` float32 timesteps of a call (a scalar timestep is every row's)."""
    if timestep is None:
        raise ValueError("per-token steps need the transformer's timestep argument")
    value = torch.as_tensor(timestep, device=device).float()
    if value.ndim > 1 or value.numel() not in (1, rows):
        raise ValueError(
            f"per-token steps need one timestep per sample; got a timestep of shape {tuple(value.shape)} for {rows} "
            "rows (per-token timesteps, as in Wan 2.2's image-to-video, are not supported)"
        )
    value = value.flatten()
    return value.expand(rows) if value.numel() == 1 else value


def _position(module: torch.nn.Module, name: str) -> int | None:
    parameters = list(inspect.signature(module.forward).parameters)
    return parameters.index(name) if name in parameters else None


def _self_attention(target: Target, block: torch.nn.Module):
    stack = next(s for s, b in target.spec.block_list(target.transformer) if b is block)
    for component in stack.components:
        joint_or_self = component.attention in ("self", "joint")
        if component.kind == "attention" and joint_or_self and getattr(block, component.module, None):
            yield component


@register(TokenStepConfig, name="token_steps", phase="tokens")
def apply_token_steps(target: Target, config: TokenStepConfig) -> TokenStepHandle:
    """Run each sample's tokens under their own step budget; see :class:`TokenStepHandle`."""
    return TokenStepHandle(target, config)
