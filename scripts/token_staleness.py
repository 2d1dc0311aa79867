"""Which staleness costs per-token step allocation its quality: a diagnostic on the bundled models.

At equal token-steps (``TokenStepConfig(budget=share, dense_steps=2, dense_share=0, buckets=16, min_active=0)``,
every step of the grid), the model computes every token and the tokens a step skips get their cached velocity, as in
``python -m accel.bench tokens --bounds``; what the computed tokens attend to is emulated, per mode:

* ``current``: every token's keys and values current (the bound ``current-context``);
* ``stale-kv``: the skipped tokens' keys and values from the step that last computed them, what
  :class:`~accel.caching.TokenStepConfig` attends to (hooks on every self-attention's key and value projections);
* ``stale-hidden``: the skipped tokens' block inputs from that step, their keys and values recomputed with this
  step's timestep modulation (is the modulation what goes stale?);
* ``stale-hidden-delta``: that, plus the change of the skipped tokens' patch embedding since (their latents
  moved by the cached Euler update): the cheapest refresh a block could do.

The selection is our velocity rule, made before each transformer call from the history and the next
timestep. Prints one line per share: fewer steps, ours as built, and each mode, PSNR against full compute.

    python scripts/token_staleness.py video 20
"""

from __future__ import annotations

import argparse
import math

import torch

import accel
from accel.bench.token_bounds import _from_tokens, _to_tokens
from accel.bench.token_report import psnr_of
from accel.bench.tokens import _image_model, _video_model
from accel.caching import TokenStepConfig
from accel.caching.token_select import TokenHistory, select, velocity_scores
from accel.geometry import patch_size

MODES = ("current", "stale-kv", "stale-hidden", "stale-hidden-delta")


class Emulation:
    """The hooks of one mode on ``model``'s transformer and a wrapped ``scheduler.step``, while open."""

    def __init__(self, model, config: TokenStepConfig, steps: int, mode: str):
        self.pipe, self.config, self.steps, self.mode = model.pipe, config, steps, mode
        transformer = self.pipe.transformer
        self.blocks = transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks
        dims = patch_size(transformer)
        self.patches = {4: dims[1:], 5: dims}
        self.mask, self.history, self.calls, self.branch = None, None, 0, 0
        self.store: dict[tuple, torch.Tensor] = {}
        self.delta: torch.Tensor | None = None

    def rows_mask(self, rows: int) -> torch.Tensor | None:
        """``(rows, tokens, 1)`` computed tokens of a call (CFG branches in one batch repeat the prompts'), None
        on a step that computes every token."""
        if self.mask is None:
            return None
        return self.mask.repeat(rows // self.mask.shape[0], 1)[..., None]

    def mix(self, key: tuple, current: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``current: (rows, tokens, width)`` with the skipped tokens' rows taken from the store (plus the patch
        embedding's change in the delta mode); the computed ones are stored."""
        mask = self.rows_mask(current.shape[0])
        if mask is None or key not in self.store:
            self.store[key] = current.detach().clone()
            return current
        stale = self.store[key]
        if layer is not None and self.mode == "stale-hidden-delta":
            if layer == 0:
                self.delta = current - stale
            stale = stale + self.delta
        self.store[key] = torch.where(mask, current, self.store[key])
        return torch.where(mask, current, stale)

    def __enter__(self) -> Emulation:
        transformer, handles = self.pipe.transformer, []

        def count_call(module, args, kwargs):
            self.branch, self.calls = self.calls % 2, self.calls + 1  # Wan runs its CFG branches in two calls

        handles.append(transformer.register_forward_pre_hook(count_call, with_kwargs=True))
        for layer, block in enumerate(self.blocks):
            if self.mode.startswith("stale-hidden"):
                handles.append(block.register_forward_pre_hook(self.block_hook(layer), with_kwargs=True))
            elif self.mode == "stale-kv":
                for name in ("to_k", "to_v"):
                    hook = lambda m, i, out, key=(layer, name): self.mix((self.branch, *key), out)  # noqa: E731
                    handles.append(getattr(block.attn1, name).register_forward_hook(hook))
        self.handles = handles
        self.original = self.pipe.scheduler.step
        self.pipe.scheduler.step = self.step
        return self

    def __exit__(self, *exc) -> None:
        del self.pipe.scheduler.step
        for handle in self.handles:
            handle.remove()

    def block_hook(self, layer: int):
        def hook(module, args, kwargs):
            if args:
                return (self.mix((self.branch, layer), args[0], layer), *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=self.mix((self.branch, layer), kwargs["hidden_states"], layer))

        return hook

    def step(self, model_output, timestep, sample, *args, **kwargs):
        patch = self.patches[model_output.ndim]
        velocity = _to_tokens(model_output.float(), patch)  # (rows, tokens, width)
        rows, tokens, _ = velocity.shape
        scheduler = self.pipe.scheduler
        index = scheduler.step_index or 0
        time = torch.as_tensor(timestep, dtype=torch.float32).flatten()[:1].expand(rows)
        self.calls = 0
        if index == 0:
            self.history, mixed = TokenHistory.start(velocity, time, self.steps), model_output
        else:
            active = self.mask if self.mask is not None else torch.ones(rows, tokens, dtype=torch.bool)
            mixed = _from_tokens(self.history.update(velocity, active, time), model_output, patch)
        self.mask = None
        upcoming = index + 1
        if upcoming < self.steps and (count := self.config.active_counts(self.steps, tokens)[upcoming]) < tokens:
            later = torch.as_tensor(scheduler.timesteps[upcoming], dtype=torch.float32).flatten()[:1].expand(rows)
            skipped = max(2, math.ceil(2 * tokens / count))
            scores = velocity_scores(self.history, later, self.config.rate_floor, skipped)
            self.mask = torch.zeros(rows, tokens, dtype=torch.bool).scatter_(1, select(scores, count), True)
        return self.original(mixed.to(model_output.dtype), timestep, sample, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("image", "video"))
    parser.add_argument("steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _video_model(4) if args.which == "video" else _image_model(8)
    full = model.generate(model.prompts, args.steps, 0)
    for share in (0.5, 0.25):
        config = TokenStepConfig(budget=share, dense_steps=2, dense_share=0.0, buckets=16, min_active=0)
        fewer = round(share * args.steps)
        row = {f"steps-{fewer}": psnr_of(model.generate(model.prompts, fewer, 0), full)}
        with accel.apply(model.pipe, config):
            row["ours"] = psnr_of(model.generate(model.prompts, args.steps, 0), full)
        for mode in MODES:
            with Emulation(model, config, args.steps, mode):
                row[mode] = psnr_of(model.generate(model.prompts, args.steps, 0), full)
        print(args.which, args.steps, share, "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
