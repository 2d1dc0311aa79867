"""Per-token step selection (accel.caching.token_select) and the sparse path of the handle: each row ranks its own
tokens (a batch never cross-talks, starved tokens included), blocks see only the active tokens, and a sparse step
whose cached keys and values are current reproduces full compute."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding
from tiny_models import TINY_MODELS, denoise

import accel
import accel.caching.token_allocation as token_allocation
from accel.caching import TokenStepConfig
from accel.caching.token_select import TokenHistory, select, velocity_scores

FAMILIES = ["wan", "pixart", "ltx", "sd3", "flux"]


def _history(changes: torch.Tensor, skipped: torch.Tensor) -> TokenHistory:
    """A history of ``changes.shape[0]`` rows whose tokens changed by ``changes: (rows, tokens)`` between the
    computed steps at t=1000 and t=900 and were since skipped ``skipped: (rows, tokens)`` steps."""
    rows, tokens = changes.shape
    history = TokenHistory.start(torch.zeros(rows, tokens, 2), torch.tensor([1000.0]), 10)
    every = torch.ones(rows, tokens, dtype=torch.bool)
    history.update(changes[..., None].expand(rows, tokens, 2), every, torch.tensor([900.0]))
    history.skipped = skipped.to(history.skipped.dtype)
    return history


def _row(history: TokenHistory, row: int) -> TokenHistory:
    return TokenHistory(*(getattr(history, name)[row : row + 1] for name in TokenHistory.__dataclass_fields__))


def test_starved_tokens_rank_within_their_own_row_a_batch_scores_each_row_as_alone():
    """Row 0 changes slowly, row 1 (another prompt) about 1e8 times faster; row 0's tokens 0 and 1 are starved
    (skipped 4 and 3 steps): alone, the longer-skipped token 0 comes first. Ranked against the batch's highest
    score (as before the fix), both starved tokens got the same float32 score and row 0 picked token 1."""
    changes = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1e9, 2e9, 3e9, 4e9]])
    skipped = torch.tensor([[4, 3, 0, 0], [0, 0, 0, 0]])
    history, now = _history(changes, skipped), torch.tensor([800.0])
    batch = velocity_scores(history, now, floor=0.1, max_skipped=3)
    for row in range(2):
        alone = velocity_scores(_row(history, row), now, floor=0.1, max_skipped=3)
        assert torch.equal(batch[row : row + 1], alone), row
        assert torch.equal(select(batch[row : row + 1], 1), select(alone, 1)), row
    assert select(batch, 1)[0].tolist() == [0]  # the longest-skipped token, whatever the other row holds
    assert select(batch, 2)[0].tolist() == [0, 1]  # both starved tokens, before any faster-changing one


def _selections(monkeypatch) -> list[torch.Tensor]:
    """Every ``(rows, count)`` selection the handle makes, in order."""
    made: list[torch.Tensor] = []

    def recording(scores, count, highest=True):
        made.append(select(scores, count, highest))
        return made[-1]

    monkeypatch.setattr(token_allocation, "select", recording)
    return made


@pytest.mark.parametrize("branches", ["paired", "own"])
@pytest.mark.parametrize("family", FAMILIES)
def test_with_starvation_forced_a_batch_selects_each_prompts_tokens_as_that_prompt_alone(family, branches, monkeypatch):
    """Through the handle (its per-row normalisation and CFG pairing), with tokens starving every other step:
    CFG batched, rows uncond 1, uncond 2, cond 1, cond 2; each prompt alone, uncond and cond."""
    tiny, made = TINY_MODELS[family], _selections(monkeypatch)
    model = tiny.build()
    config = TokenStepConfig(
        budget=0.4, max_skipped_steps=2, min_active=0, branches=branches, assume_flow_matching=True
    )
    runs = []
    for seeds in ([1, 2], [1], [2]):
        made.clear()
        with accel.apply(model, config) as handle:
            denoise(model, tiny, seeds, steps=12, cfg=True)
            assert int(max(m.max() for m in handle.stats().heat_maps)) < 12  # some tokens were skipped
        runs.append(list(made))
    batch, first, second = runs
    assert len(batch) == len(first) == len(second) > 0
    for together, one, two in zip(batch, first, second, strict=True):
        assert torch.equal(together, torch.stack([one[0], two[0], one[1], two[1]]))


# -- the sparse path: blocks see the active tokens; with current keys and values it is full compute ------------


def _timeless(family: str) -> torch.nn.Module:
    """The tiny model with its timestep embedding's last layer zeroed: the output no longer depends on the
    timestep, so a call at a later step on the same latents recomputes exactly what the previous call did, and
    the keys and values cached there are the current ones."""
    model = TINY_MODELS[family].build()
    for module in model.modules():
        if isinstance(module, TimestepEmbedding):
            module.linear_2.weight.zero_()
            module.linear_2.bias.zero_()
    return model


class _BlockInputs:
    """Records the shape of the ``hidden_states`` every transformer block of ``blocks`` receives, in call order,
    until :meth:`remove`."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.shapes: list[torch.Size] = []
        self.hooks = [block.register_forward_pre_hook(self._record, with_kwargs=True) for block in blocks]

    def _record(self, module, args, kwargs) -> None:
        self.shapes.append((args[0] if args else kwargs["hidden_states"]).shape)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sparse_step_runs_the_blocks_on_the_active_tokens_and_with_current_keys_and_values_equals_full_compute(
    family,
):
    tiny, model = TINY_MODELS[family], _timeless(family)
    latents = tiny.latents(2, torch.Generator().manual_seed(0))
    conditions = tiny.conditions([1, 2])

    def call(timestep: float) -> torch.Tensor:
        kwargs = tiny.forward_kwargs(latents, conditions, torch.full((2,), timestep))
        return tiny.prediction(model(**kwargs), latents)

    full = call(1000.0)
    assert torch.equal(call(500.0), full)  # the construction: the timestep no longer matters
    scale = float(full.abs().max())
    config = TokenStepConfig(budget=0.5, dense_steps=2, min_active=0, assume_flow_matching=True)
    for corrupt in (False, True):
        with accel.apply(model, config) as applied:
            handle = applied[TokenStepConfig]
            hooks = _BlockInputs([block for _, block in handle.blocks])
            for t in (1000.0, 950.0):  # dense: fill the caches and the velocity history
                assert torch.allclose(call(t), full, rtol=0, atol=1e-6 * scale)
            tokens = hooks.shapes[0][1]
            if corrupt:  # keys unlike the latents' own: the skipped tokens' entries stay wrong
                for keys, _ in handle.active.caches:
                    keys.add_(torch.randn_like(keys))
            hooks.shapes.clear()
            sparse = [call(t) for t in (900.0, 800.0)]
            hooks.remove()
            active = handle.stats().active
        assert active == (1.0, 1.0, 0.5, 0.5)
        width = hooks.shapes[-1][2]
        blocks = len(handle.blocks)
        assert len(hooks.shapes) == 2 * blocks
        # the first block receives the whole sequence and gathers; every later one runs on the active tokens only
        expected = [(2, tokens if i % blocks == 0 else tokens // 2, width) for i in range(2 * blocks)]
        assert hooks.shapes == expected
        errors = [float((out - full).abs().max()) / scale for out in sparse]
        if corrupt:  # measured 0.02-0.06 of the output's largest value
            assert min(errors) > 1e-3, errors
        else:  # measured 0 (bit-identical) on all five models
            assert max(errors) < 1e-5, errors
