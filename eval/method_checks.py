"""What can be known about a method on a pipeline before anything runs (:func:`check_method`), and whether a
pipeline can denoise in a given number of steps (:func:`check_steps`): the harness, ``accel generate`` and
``accel search`` call them before any compute, so a bad name, file or step count fails in one line, first."""

from __future__ import annotations

from typing import Any

from accel.eval.combined import part_configs
from accel.eval.methods import Method, UnsupportedMethod

#: pipelines whose ``__call__`` takes another branch at one step that stock schedulers cannot serve (PixArt-Alpha
#: reads the scheduler's second output, made for one-step distilled models) -> why
ONE_STEP_FAILS = {
    "PixArtAlphaPipeline": "its one-step branch reads a second output of the scheduler's step, which "
    "this scheduler does not return",
}
#: schedulers whose step returns that second output (the denoised sample), so one step works with them
ONE_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")


def check_steps(pipe: Any, steps: int, what: str = "steps") -> None:
    """Raise ``ValueError`` if ``pipe`` cannot denoise in ``steps`` steps (see :data:`ONE_STEP_FAILS`)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{what} must be an int >= 1, got {steps!r}")
    reason = ONE_STEP_FAILS.get(type(pipe).__name__)
    scheduler = type(getattr(pipe, "scheduler", None)).__name__
    if steps == 1 and reason is not None and scheduler not in ONE_STEP_SCHEDULERS:
        raise ValueError(f"{what}: {type(pipe).__name__} cannot run 1 step ({reason}); use 2 or more")


def check_method(method: Method, pipe: Any, steps: int) -> None:
    """Everything that can be known about ``method`` on ``pipe`` without running it, checked before any compute:
    its step count, its file (read and parsed), its schedule against the model's layout, a front's pick.

    Raises:
        ValueError: in one line, the method and what is wrong with it (a missing or bad file, a schedule made for
            another model, a parameter out of range for ``steps`` steps, a model accel has no adapter for, a peer's
            package not installed).
    """
    kind = method.kind
    try:
        check_steps(pipe, method.params["steps"] if kind == "steps" else steps)
        if kind in ("full", "steps"):
            return
        if getattr(pipe, "transformer", None) is None:
            import torch

            parts = [name for name, c in getattr(pipe, "components", {}).items() if isinstance(c, torch.nn.Module)]
            raise ValueError(
                f"caching needs a transformer pipeline; {type(pipe).__name__} has no transformer (its modules: "
                f"{', '.join(parts) or 'none'})"
            )
        if kind == "cache-dit":
            from accel.eval.cache_dit_peer import import_cache_dit

            try:
                import_cache_dit()
            except ImportError as error:
                raise ValueError(str(error)) from None
            return  # cache-dit says itself whether it can cache this pipeline, recorded in its turn
        if kind.startswith("diffusers-") or kind in ("tokens", "quant"):
            return  # the technique says itself what it cannot do, recorded as unsupported in its turn
        for config in part_configs(pipe, method.parts, steps, False, None):
            _check_config(config, pipe)
    except UnsupportedMethod:
        return  # a valid method this pipeline cannot run: the harness records why, in its turn
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"method {method.name!r}: {message}") from None


def _check_config(config: Any, pipe: Any) -> None:
    """A config's plan or schedule against the pipeline's model, before any compute: a schedule's layout, a
    sparse plan's layers and heads."""
    from accel.caching import CacheConfig, Schedule, layout_of
    from accel.sparse import SparseAttentionConfig
    from accel.sparse.plan import check_plan

    if isinstance(config, CacheConfig) and isinstance(config.schedule, Schedule):
        config.schedule.check_layout(layout_of(pipe))
    elif isinstance(config, SparseAttentionConfig):
        check_plan(config.plan, pipe.transformer)
