"""``python -m accel.bench search`` on the tiny PixArt pipeline, and the dominance and noise rules it judges by."""

import pytest
import torch
from conftest import build_tiny_pixart_pipeline

from accel.eval.noise import dominates, paired_standard_error, why_not_dominated, within_noise

pytest.importorskip("pymoo")

NOISE = {"fid": 2.0, "prompt_score": 0.5}


def row(speedup, psnr, fid=10.0, prompt_score=5.0):
    return {"speedup": speedup, "psnr": psnr, "fid": fid, "prompt_score": prompt_score}


def test_dominance_needs_speed_psnr_and_no_worse_fid_and_prompt_score_beyond_noise():
    baseline = row(2.0, 30.0)
    assert dominates(row(2.0, 30.1), baseline, NOISE)
    assert not dominates(row(1.99, 40.0), baseline, NOISE)  # slower
    assert not dominates(row(3.0, 30.0), baseline, NOISE)  # PSNR not better
    assert dominates(row(2.5, 31.0, fid=12.0), baseline, NOISE)  # FID worse, within noise
    assert not dominates(row(2.5, 31.0, fid=12.1), baseline, NOISE)
    assert not dominates(row(2.5, 31.0, prompt_score=4.4), baseline, NOISE)
    assert dominates(row(2.5, 31.0, fid=50.0), baseline, None)  # FID not measured: speed and PSNR only


def test_the_nearest_miss_names_the_member_failing_fewest_criteria():
    rows = {"fora": row(2.0, 30.0), "a": row(1.5, 20.0), "b": row(2.5, 29.0), "c": row(2.5, 35.0, prompt_score=4.0)}
    assert why_not_dominated(rows, ["a", "b", "c"], "fora", NOISE) == (
        "nearest c (2.50x): prompt score 4.00 < 5.00 - 0.50"
    )  # a fails speed and PSNR; b PSNR, c the prompt score: one each, as fast, c has the higher PSNR
    rows["d"] = row(1.9, 50.0)  # fails speed only, and is the closest in speed
    assert why_not_dominated(rows, ["a", "b", "c", "d"], "fora", NOISE) == "nearest d (1.90x): speedup 1.90x < 2.00x"
    assert why_not_dominated(rows, ["a"], "fora", NOISE) == (
        "nearest a (1.50x): speedup 1.50x < 2.00x, PSNR 20.00 <= 30.00"
    )


def test_within_noise_is_one_sided():
    full = row(1.0, 100.0)
    assert within_noise(row(2.0, 30.0, fid=12.0, prompt_score=4.5), full, NOISE)
    assert within_noise(row(2.0, 30.0, fid=1.0, prompt_score=9.0), full, NOISE)  # better is within
    assert not within_noise(row(2.0, 30.0, fid=12.5), full, NOISE)
    assert not within_noise(row(2.0, 30.0, prompt_score=4.4), full, NOISE)


def test_paired_standard_error_is_that_of_the_per_prompt_differences():
    full = torch.tensor([10.0, 12.0, 8.0, 11.0])
    assert paired_standard_error(full + 0.5, full) == 0.0  # a constant shift has no prompt-to-prompt spread
    shifted = full + torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert paired_standard_error(shifted, full) == pytest.approx((4 / 3) ** 0.5 / 2)
    assert paired_standard_error(full[:1], full[:1]) == 0.0


def test_bench_search_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from accel.bench.search import run
    from accel.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        build_tiny_pixart_pipeline().save_pretrained(tmp_path / "model")
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red apple\na blue car\na green tree\nthe moon\n")
        common = ["--model", str(tmp_path / "model"), "--steps", "5", "--max-sequence-length", "16"]
        search = ["search", *common, "--prompts", str(prompts), "--algorithm", "dp", "--out", str(tmp_path / "front")]
        assert main(search) == 0
        result = run(
            [*common, "--front", str(tmp_path / "front"), "--eval-prompts", str(prompts), "--images", "4"]
            + ["--seed-sets", "2", "--batch", "2", "--repeats", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    heuristics = {"fora-2", "fora-3", "fora-4", "taylorseer-2", "taylorseer-3", "taylorseer-4", "delta-dit", "tgate"}
    assert heuristics <= set(rows) and {"diffusers-fbc-0.08", "diffusers-magcache", "fbc-0.08"} <= set(rows)
    members = [name for name in rows if name.startswith("front-")]
    assert result["baselines"] == len(rows) - 1 - len(members) and len(members) >= 1
    assert 0 <= result["dominated"] <= result["baselines"] and result["front_reused"] is True
    assert rows["full"]["psnr"] == 100.0 and rows["full"]["speedup"] == 1.0
    assert all({"speedup", "psnr", "fid", "prompt_score", "prompt_score_se"} <= set(r) for r in rows.values())
    assert rows["full"]["prompt_score_se"] == 0.0
    noise = result["noise"]
    assert (
        noise["fid"] >= 0
        and len(noise["full_fids"]) == 2
        and noise["fid"] == pytest.approx(max(noise["full_fids"]) - min(noise["full_fids"]), abs=1e-3)
    )
    assert result["best_speedup_within_noise"] >= 1.0
    printed = capsys.readouterr().out
    assert "front dominates" in printed and "run-to-run noise over 2 full-compute seed sets" in printed
