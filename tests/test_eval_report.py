"""The report on a small synthetic results set: it leads with a decision, every quality number carries its noise,
noisy metrics are flagged, one plot per kind of metric, labels joined to their dots, a grid that says what it
shows; and KID/FID of full compute against itself."""

import re

import pytest
import torch
from PIL import Image

from accel.eval.decision import beaten_by_fewer_steps, floors, noise_dominated
from accel.eval.fid import FidKidConfig, fid_kid_from_features
from accel.eval.html import html_report
from accel.eval.report import decision_rows, markdown_report, summary_rows

PROMPTS = [f"prompt {i}" for i in range(16)]


def _per_sample(mean: float, spread: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(len(PROMPTS), generator=generator, dtype=torch.float64)
    values = (values - values.mean()) / values.std()
    return (mean + spread * values).tolist()


def _metric(values: list[float] | None, better: str, value: float | None = None, se: float | None = None) -> dict:
    if values is not None:
        mean = sum(values) / len(values)
        se = float(torch.tensor(values, dtype=torch.float64).std() / len(values) ** 0.5)
        return {"value": mean, "better": better, "computed": "synthetic", "se": se, "per_sample": values}
    if value is None:
        return {"value": None, "better": better, "computed": "synthetic", "unavailable": "no weights"}
    return {"value": value, "better": better, "computed": "synthetic", **({"se": se} if se is not None else {})}


def _trial(method: str, kind: str, speedup: float, psnr: float, fid: float, alignment: float, seed: int) -> dict:
    full = kind == "full"
    return {
        "method": method,
        "kind": kind,
        "status": "ok",
        "steps": 20,
        "images": f"images/{method}",
        "latency": {"speedup": speedup, "per_image_s": 0.1 / speedup, "spread": 0.02},
        "macs": {"per_image": 1e9 / speedup, "how": "FlopCounterMode"},
        "memory": {"peak_bytes": 2**20, "what": "tensors, weights excluded"},
        "metrics": {
            "PSNR": _metric([100.0] * len(PROMPTS) if full else _per_sample(psnr, 2.0, seed), "higher"),
            "SSIM": _metric([1.0] * len(PROMPTS) if full else _per_sample(0.9, 0.02, seed), "higher"),
            "LPIPS": _metric(None, "lower"),
            "FID-EffNetLite0": _metric(None, "lower", value=-1e-9 if full else fid, se=0.0 if full else 1.0),
            "KID-EffNetLite0": _metric(None, "lower", value=0.0 if full else fid / 100, se=0.0 if full else 0.02),
            "alignment": _metric(_per_sample(alignment, 3.0, 100 + seed), "higher"),
        },
    }


@pytest.fixture
def results(tmp_path):
    trials = [
        _trial("full", "full", 1.0, 100.0, 0.0, 12.0, 0),
        _trial("steps-10", "steps", 1.86, 34.9, 1.5, 11.9, 1),
        _trial("fora-2", "fora", 1.67, 34.95, 3.0, 11.8, 2),
        _trial("taylorseer-2", "taylorseer", 1.70, 41.0, 2.5, 12.1, 3),
        _trial("fora-3", "fora", 2.50, 31.0, 9.0, 11.7, 4),
    ]
    for trial in trials:  # one image per prompt, so that the grid has something to show
        folder = tmp_path / trial["images"]
        folder.mkdir(parents=True)
        for index in range(len(PROMPTS)):
            Image.new("RGB", (64, 64), (index * 10, 100, 200)).save(folder / f"{index:05d}.png")
    run = {
        "model": {"model": "synthetic", "pipeline_class": "PixArtAlphaPipeline"},
        "transformer_class": "PixArtTransformer2DModel",
        "seeds": list(range(len(PROMPTS))),
        "prompts_source": "built-in",
        "prompts_sha256": "0" * 64,
        "config": {
            "steps": 20,
            "guidance_scale": 4.0,
            "prompts": PROMPTS,
            "timing": {"warmup": 1, "repeats": 3, "batch": 4},
        },
        "device": "cpu",
        "num_processes": 1,
        "created": "today",
        "versions": {"torch": "x"},
        "pipeline_call_kwargs": {},
    }
    return {"run": run, "trials": trials}, tmp_path


def test_decision_names_the_fastest_method_per_floor_and_compares_with_fewer_steps(results):
    data, _ = results
    found = {floor.label: floor for floor in floors(data)}
    assert found["PSNR >= 40 dB"].best["method"] == "taylorseer-2"
    assert found["PSNR >= 40 dB"].verdict() == "no steps-N in this run meets it"
    assert found["PSNR >= 30 dB"].best["method"] == "fora-3"  # 2.5x beats steps-10's 1.86x
    assert found["PSNR >= 30 dB"].verdict() == "beats plain fewer steps (steps-10: 1.86x)"
    # FID within noise (2 x SE 1.0 of the difference from full compute's 0): steps-10 (1.5) is the fastest there;
    # fora-3 (9.0) is not within it
    fid = found["FID-EffNetLite0 within noise of full compute"]
    assert fid.best["method"] == "steps-10" and "plain fewer steps is the fastest" in fid.verdict()
    header, rows = decision_rows(data)
    assert header[:2] == ["quality floor", "fastest method meeting it"] and len(rows) == len(found)
    markdown = markdown_report(data)
    assert markdown.index("## Which method to use") < markdown.index("## All methods")


def test_noisy_metric_is_flagged_and_every_number_carries_its_noise(results):
    data, _ = results
    assert noise_dominated(data, "alignment")  # per-image spread 3 over 16 images >> 0.4 between methods
    assert not noise_dominated(data, "PSNR")
    header, rows = summary_rows(data)
    assert "alignment (flagged: noise)" in header and "PSNR" in header
    assert not any(h.startswith("LPIPS") for h in header)  # n/a in every row: dropped
    fora = rows[[r[0] for r in rows].index("fora-2")]
    psnr = fora[header.index("PSNR")]
    assert re.fullmatch(r"34\.95 ±1(\.0)?", psnr)  # twice the SE of 16 values with std 2: 1.0
    full = rows[0]
    assert full[header.index("FID-EffNetLite0")].startswith("0") and "-0.0000" not in "".join(full)


def test_html_leads_with_the_decision_one_plot_per_kind_and_a_grid_that_says_what_it_shows(results):
    data, out = results
    page = html_report(data, out)
    assert page.index("Which method to use") < page.index("All methods") < page.index("<svg")
    assert page.count("<svg") == 2  # PSNR and FID: not SSIM or KID again, nor the flagged alignment
    assert "alignment ↑ vs speedup" not in page and "FID-EffNetLite0 ↓ vs speedup" in page
    assert "<title>fora-2: 1.67x, PSNR 34.95" in page  # hover values
    assert "The first 8 of the 16 prompts" in page
    assert page.count("class='psnr'") == 8 * 5 and "reference" in page and " dB</div>" in page
    assert "image-rendering: auto" in page and "pixelated" not in page
    assert "<tr class='pick'><td>fora-3</td>" in page
    # the labels of the three methods near 1.7x and 35 dB collide: moved ones are joined to their dots
    assert 'stroke="#999" stroke-width="0.7"' in page


def test_kid_of_full_compute_against_itself_is_zero_and_close_sets_are_not_negative():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 64, generator=generator)
    same = fid_kid_from_features(features, features, "X", FidKidConfig(), paired=True)
    assert same["KID-X"] == 0.0 and same["KID-X-std"] == 0.0 and abs(same["FID-X"]) < 1e-6  # float64 sqrtm round-off
    unpaired = fid_kid_from_features(features, features, "X", FidKidConfig())
    assert unpaired["KID-X"] < 0  # the two-sample estimator on paired sets: the bias this avoids
    near = features + 0.1 * torch.randn(16, 64, generator=generator)
    far = features + 1.0 * torch.randn(16, 64, generator=generator)
    kid_near = fid_kid_from_features(features, near, "X", FidKidConfig(), paired=True)["KID-X"]
    kid_far = fid_kid_from_features(features, far, "X", FidKidConfig(), paired=True)["KID-X"]
    assert 0 <= kid_near < kid_far


def test_fid_against_full_computes_own_images_needs_the_measured_noise(results):
    data, _ = results
    for trial in data["trials"]:
        trial["metrics"]["FID-EffNetLite0"]["paired"] = True  # the reference: full compute's own images
    found = {floor.label: floor for floor in floors(data)}
    fid = found["FID-EffNetLite0 within noise of full compute"]
    assert fid.best is None and "--noise-seed-sets" in fid.verdict()
    assert found["PSNR >= 30 dB"].best["method"] == "fora-3"  # the other floors stand
    data["noise"] = {"noise": {"FID-EffNetLite0": 5.0}, "values": {}, "better": {}, "seeds": [0, 16], "how": "x"}
    fid = {floor.label: floor for floor in floors(data)}["FID-EffNetLite0 within noise of full compute"]
    assert fid.best["method"] == "steps-10"  # FID 1.5 <= 0 + 5.0 at 1.86x; fora-3's 9.0 at 2.5x is not


def test_methods_that_plain_fewer_steps_matches_are_named(results):
    data, _ = results
    # steps-10 (1.86x) is faster than fora-2 (1.67x) with PSNR 34.9 vs 34.95 and FID 1.5 vs 3.0: within noise
    assert beaten_by_fewer_steps(data, ["PSNR", "FID-EffNetLite0"]) == {"fora-2": "steps-10"}
    assert "fora-2 (by steps-10)" in markdown_report(data)
