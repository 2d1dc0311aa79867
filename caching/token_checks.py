"""Where per-token step allocation applies: the model, sampler and composition checks
:class:`~accel.caching.tokens.TokenStepHandle` runs before it changes anything.

Per-token steps need a flow-matching sampler (a skipped token advances on its cached velocity), an adapter that
gives the token layout, blocks that return ``hidden_states`` with the tokens along dimension 1, and a token-wise
output projection. They compose with block caching by a schedule (cached features kept per token) but not with
a dynamic first-block policy, nor with sparse attention, which replaces the same self-attention processors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from accel.adapters import is_flow_matching
from accel.api import Target

if TYPE_CHECKING:
    from accel.caching.token_config import TokenStepConfig


#: why per-token steps and sparse attention do not compose, said whichever is applied second
SPARSE_REFUSAL = (
    "TokenStepConfig does not compose with SparseAttentionConfig: both replace the model's self-attention "
    "processors (per-token steps attend from the active tokens over cached keys and values, sparse attention "
    "over a pattern of every token); apply one of them"
)


def _check_caching(target: Target) -> None:
    """Block caching underneath (applied first, in an earlier phase) composes through per-token cached features
    (:mod:`accel.caching.token_features`), except a dynamic policy, whose decision compares a whole-sequence
    first-block residual between steps that compute different tokens."""
    from accel.caching.config import CacheConfig

    handle = target.tracker.active.get(CacheConfig)
    if handle is not None and handle.engine.dynamic:
        raise ValueError(
            "TokenStepConfig does not compose with a dynamic (first-block) CacheConfig policy: its decision "
            "compares whole-sequence residuals between steps that compute different tokens; use a schedule "
            "(e.g. accel.caching.fora) or apply one of them"
        )


def check_applies(target: Target, config: TokenStepConfig) -> None:
    """Refuse models, samplers and compositions where per-token steps do not apply, before anything changes.

    Raises:
        ValueError: with the reason.
    """
    model, spec = target.transformer, target.spec
    name = type(model).__name__
    _check_caching(target)
    from accel.sparse.apply import SparseAttentionConfig

    if SparseAttentionConfig in target.tracker.active:
        raise ValueError(SPARSE_REFUSAL)
    if target.pipeline is not None and getattr(target.pipeline, "scheduler", None) is not None:
        if not is_flow_matching(target.pipeline, spec):
            scheduler = type(target.pipeline.scheduler).__name__
            raise ValueError(
                f"per-token steps need a flow-matching sampler (the cached velocity advances skipped tokens); "
                f"{scheduler} with prediction_type={target.pipeline.scheduler.config.get('prediction_type')!r} "
                "is not one"
            )
    elif not (spec.flow_matching or config.assume_flow_matching):
        raise ValueError(
            f"{name}'s adapter does not say flow matching; apply to the pipeline (its scheduler decides) or set "
            "TokenStepConfig(assume_flow_matching=True) if this transformer samples a flow"
        )
    if spec.token_layout is None:
        raise ValueError(f"per-token steps need the token layout of the model's adapter; {name}'s has none")
    if any("hidden_states" not in stack.outputs for stack in spec.stacks):
        raise ValueError(f"per-token steps need blocks that return hidden_states; {name}'s do not")
    if any(dict(stack.token_axes).get("hidden_states") != 1 for stack in spec.stacks):
        raise ValueError(f"per-token steps need hidden_states' tokens along dimension 1; {name}'s spec differs")
    if not isinstance(getattr(model, "proj_out", None), torch.nn.Linear):
        raise ValueError(f"per-token steps need a token-wise output projection `proj_out`; {name} has none")
