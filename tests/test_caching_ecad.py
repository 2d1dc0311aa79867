"""ECAD's schedules: loaded from a file in ECAD's own JSON layout, run with ECAD's meaning; the schedule and info
commands read a transformer's config.json only."""

import json
import logging

import numpy as np
import pytest
import torch
from test_caching_engine import generate
from tiny_models import TINY_MODELS

import accel
from accel.caching import CacheConfig, Schedule, layout_of
from accel.cli import main
from accel.pipelines.loading import load_transformer_skeleton

COMPONENTS = ("attn1", "attn2", "ff")


def write_ecad(path, mask: np.ndarray, **extra) -> None:
    """Write ``mask`` (steps, blocks, 3; True = recompute) as ECAD saves a PixArt schedule."""
    steps, blocks, _ = mask.shape
    schedule = {
        f"{step:03}": {
            str(block): {name: bool(mask[step, block, c]) for c, name in enumerate(COMPONENTS)}
            for block in range(blocks)
        }
        for step in range(steps)
    }
    body = {"num_blocks": blocks, "num_inference_steps": steps, "name": "ecad-test", "attributes": {"gen": 7}}
    data = {"cache_schedule": {**body, "schedule": schedule, **extra}, "config": {"seed": 1}, "metrics": {"fid": 9.5}}
    path.write_text(json.dumps(data, indent=4))


def _mask(steps: int, blocks: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = rng.random((steps, blocks, 3)) < 0.6
    mask[0, 0] = (False, True, False)  # ECAD reuses at step 0 sometimes: nothing is cached there yet
    return mask


def test_from_ecad_reads_ecads_layout_with_its_meaning(tmp_path):
    mask = _mask(5, 4)
    write_ecad(tmp_path / "ecad.json", mask)
    schedule = Schedule.from_ecad(tmp_path / "ecad.json")
    assert np.array_equal(schedule.mask, mask)
    assert schedule.components == ("self_attn", "cross_attn", "ffn") and schedule.reuse == "output"
    assert schedule.model_class == "PixArtTransformer2DModel"
    assert schedule.provenance["generator"] == "ecad" and schedule.provenance["attributes"] == {"gen": 7}
    assert schedule.metrics == {"fid": 9.5}
    assert Schedule.from_dict(schedule.to_dict()) == schedule  # saved in accel's format, it reads back the same


def test_ecad_schedule_runs_with_output_reuse_computing_where_nothing_is_cached(tiny_pixart_pipeline, tmp_path, caplog):
    pipe = tiny_pixart_pipeline
    layout = layout_of(pipe)
    mask = _mask(5, layout.num_blocks)
    write_ecad(tmp_path / "ecad.json", mask)
    caplog.set_level(logging.INFO, logger="accel.caching.notices")
    with accel.apply(pipe, CacheConfig(schedule=Schedule.from_ecad(tmp_path / "ecad.json"))) as handle:
        images = generate(pipe, steps=5)
        stats = handle.stats()
    said = [r.getMessage() for r in caplog.records if "nothing is cached" in r.getMessage()]
    assert len(said) == 1 and "step 0 reuses self_attn of block 0" in said[0]
    # the same decisions written by hand, with the step-0 reuse computing as ECAD does
    computed = mask.copy()
    computed[0] = True
    by_hand = Schedule(mask=computed, components=layout.components, reuse="output")
    with accel.apply(pipe, CacheConfig(schedule=by_hand)):
        assert torch.equal(generate(pipe, steps=5), images)
    assert stats.blocks_skipped == 0  # output reuse never skips a block whole
    assert sum(stats.reused.values()) == int((~computed).sum())  # PixArt runs both CFG halves in one call a step


def test_flux_and_malformed_ecad_files_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "flux.json"
    path.write_text(
        json.dumps(
            {
                "cache_schedule": {
                    "num_blocks": 1,
                    "num_single_blocks": 1,
                    "num_inference_steps": 1,
                    "name": "flux",
                    "schedule": {"000": {"0": {"full_attn": True, "full_ff": True, "full_ff_context": True}}},
                }
            }
        )
    )
    with pytest.raises(ValueError, match="single_proj_out"):
        Schedule.from_ecad(path)
    mask = _mask(3, 2)
    write_ecad(tmp_path / "short.json", mask)
    data = json.loads((tmp_path / "short.json").read_text())
    del data["cache_schedule"]["schedule"]["001"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="steps 0..2"):
        Schedule.from_ecad(tmp_path / "short.json")
    with pytest.raises(ValueError, match="not an ECAD schedule"):
        Schedule.from_ecad(Schedule(mask=mask, components=("a", "b", "c")).save(tmp_path / "accel.json"))


def _config_only_folder(pipe, folder):
    """A pipeline folder holding only ``transformer/config.json``: commands that load weights fail on it."""
    pipe.transformer.save_config(folder / "transformer")
    assert [p.name for p in (folder / "transformer").iterdir()] == ["config.json"]
    return folder


def test_schedule_import_command_reads_only_the_transformer_config(tiny_pixart_pipeline, tmp_path, capsys):
    folder = _config_only_folder(tiny_pixart_pipeline, tmp_path / "model")
    mask = _mask(6, layout_of(tiny_pixart_pipeline).num_blocks)
    write_ecad(tmp_path / "ecad.json", mask)
    out = tmp_path / "imported.json"
    assert main(["schedule", "import", str(tmp_path / "ecad.json"), "--model", str(folder), "--out", str(out)]) == 0
    assert Schedule.load(out) == Schedule.from_ecad(tmp_path / "ecad.json")
    assert main(["schedule", "fora", "--model", str(folder), "--steps", "6", "--out", str(tmp_path / "f.json")]) == 0
    assert Schedule.load(tmp_path / "f.json").num_blocks == layout_of(tiny_pixart_pipeline).num_blocks
    write_ecad(tmp_path / "wide.json", _mask(6, 28))  # a PixArt-XL schedule does not fit a 4-block model
    assert main(["schedule", "import", str(tmp_path / "wide.json"), "--model", str(folder), "--out", str(out)]) == 1
    assert "it has 28 blocks" in capsys.readouterr().err
    assert main(["info", "--model", str(folder)]) == 0
    assert "PixArtTransformer2DModel, 4 blocks" in capsys.readouterr().out


@pytest.mark.parametrize("tiny", TINY_MODELS.values(), ids=lambda t: t.name)
def test_skeleton_from_config_has_the_models_layout(tiny, tmp_path):
    model = tiny.model_class(**tiny.config)
    model.save_config(tmp_path / "transformer")
    skeleton = load_transformer_skeleton(str(tmp_path))
    assert type(skeleton) is tiny.model_class and next(skeleton.parameters()).is_meta
    assert layout_of(skeleton) == layout_of(model)
