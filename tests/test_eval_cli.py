"""``accel generate``, ``accel eval`` and ``accel demo`` end to end on a saved tiny PixArt pipeline."""

import hashlib
import json

import pytest
import torch
from conftest import FAST

from accel.cli import main


def test_generate_writes_one_png_per_prompt_and_image(model_dir, tmp_path, capsys, one_thread):
    argv = ["generate", "--model", str(model_dir), "--method", "fora-2", "--prompt", "a red apple"]
    argv += ["--prompt", "a blue car", "--num-images", "2", "--steps", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == [f"fora-2-{i:03d}-seed{s}.png" for i, s in enumerate([0, 1, 0, 1])]
    assert "a blue car" in capsys.readouterr().out


def test_generate_with_per_token_steps_reports_the_token_steps_computed(model_dir, tmp_path, caplog, one_thread):
    argv = ["generate", "--model", str(model_dir), "--method", "tokens-0.5", "--prompt", "a red apple"]
    with caplog.at_level("INFO"):
        assert main([*argv, "--steps", "6", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("tokens*.png"))) == 1
    assert "of token-steps computed" in caplog.text


def test_generate_picks_from_a_front_at_a_target_speedup(model_dir, tmp_path, capsys, one_thread):
    from accel.caching import Front, fora, layout_of
    from accel.pipelines.loading import load_pipeline

    layout = layout_of(load_pipeline(str(model_dir)))
    front = Front(schedules=tuple(fora(layout, 4, n).with_metrics(speedup=n - 0.5, psnr=40 - n) for n in (2, 3)))
    front.save(tmp_path / "front")
    argv = ["generate", "--model", str(model_dir), "--method", str(tmp_path / "front"), "--target-speedup", "2"]
    assert main([*argv, "--prompt", "a red apple", "--steps", "4", "--out", str(tmp_path / "images")]) == 0
    assert [p.name[-21:] for p in (tmp_path / "images").glob("*.png")] == ["front_2-000-seed0.png"]  # DIR@2
    assert main([*argv[:-1], "0", "--prompt", "x", "--out", str(tmp_path)]) == 1
    assert "target_speedup must be > 0" in capsys.readouterr().err


def test_eval_with_a_prompts_file_prints_the_summary(model_dir, tmp_path, capsys, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# emoji\na red apple\n\na blue car\n")
    out = tmp_path / "report"
    argv = ["eval", "--model", str(model_dir), "--methods", "fora-2,steps-2", "--prompts", str(prompts)]
    assert main([*argv, "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "fora-2" in printed and "steps-2" in printed and "Pareto front, speedup vs PSNR" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["config"]["prompts"] == ["a red apple", "a blue car"]
    assert results["run"]["prompts_source"] == str(prompts)
    assert results["run"]["prompts_file_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert [t["method"] for t in results["trials"]] == ["full", "fora-2", "steps-2"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_demo_runs_with_every_flag_optional(model_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(model_dir), "--methods", "fora-2", "--out", str(out), *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accel demo: 2 methods x 16 prompts" in printed and "report.html" in printed


def test_unknown_method_is_one_clear_error(capsys):
    assert main(["eval", "--methods", "fora-2,fast-please", "--out", "unused"]) == 1
    error = capsys.readouterr().err
    assert "unknown method 'fast-please'" in error and "fora-N" in error and "diffusers-pab" in error


def test_hub_id_that_cannot_be_downloaded_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here anyway; do not wait for a DNS failure
    assert main(["eval", "--model", "no-such-org/no-such-model", "--out", str(tmp_path), *FAST]) == 1
    error = capsys.readouterr().err
    assert "could not load 'no-such-org/no-such-model'" in error and "--model DIR" in error
    assert "Traceback" not in error and not (tmp_path / "results.json").exists()


def test_missing_weight_file_names_it(capsys, tmp_path):
    missing = tmp_path / "pt_inception.pth"
    assert main(["eval", "--weights-inception", str(missing), "--out", str(tmp_path)]) == 1
    assert f"inception weights file not found: {missing}" in capsys.readouterr().err


def test_list_methods(capsys):
    assert main(["eval", "--list-methods"]) == 0
    assert "steps-N" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--steps=0", "--metrics=psnr,sharpness", "--timing-repeats=0"])
def test_bad_settings_are_refused(flag, capsys, tmp_path):
    assert main(["eval", flag, "--out", str(tmp_path)]) == 1
    assert "accel eval: error:" in capsys.readouterr().err


def test_threads_restored_by_fixture():
    assert torch.get_num_threads() >= 1


def test_generate_with_an_unsupported_method_says_why(model_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(model_dir), "--method", "diffusers-magcache", "--prompt", "a red apple"]
    assert main([*argv, "--steps", "2", "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "diffusers-magcache cannot run on this pipeline" in error and "magnitude ratios" in error
    assert list(tmp_path.glob("*.png")) == []
