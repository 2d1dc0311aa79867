"""``report.html``: one self-contained page (inline CSS, inline SVG plots, images as data URIs).

Sections: the run, the summary table, one Pareto plot per quality metric (speedup on x, the metric on y,
the front highlighted and joined), image grids (one row per prompt and seed, full compute first), the
per-token step-count heat maps of per-token-steps methods (:mod:`accel.eval.heatmap`), the unsupported methods
with their reasons, what each metric computed, and provenance.

A video run's grid shows each clip as a looping animated WebP (quality 95, to keep the page small) beside the
full-compute clip of the same prompt and seed; each links to its lossless file
``animations/<method>-<key>/<index>.webp``, which :func:`write_animations` writes from the PNG filmstrips
(:func:`accel.eval.report.write_reports` calls it).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from accel.eval.decision import floors, value_noise
from accel.eval.generation import animation_bytes, load_samples, save_animation
from accel.eval.heatmap import token_heat_maps
from accel.eval.metrics import PSNR_CAP_DB
from accel.eval.report import (
    decision_rows,
    fronts,
    metric_info,
    metric_names,
    noise_lines,
    noise_note,
    noisy_metrics,
    ok_trials,
    run_summary,
    sample_unit,
    summary_rows,
    value_of,
)

GRID_PROMPTS = 8
#: images larger than this are embedded downscaled to it (smaller ones as they are, scaled up smoothly on the page)
THUMBNAIL = 256

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; }
.scroll { overflow-x: auto; }
td:first-child, th:first-child { text-align: left; font-family: monospace; }
tr.pick td:first-child { font-weight: bold; } tr.unsupported td { color: #999; }
table.decision td { text-align: left; white-space: normal; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots svg { border: 1px solid #ddd; background: #fff; }
.grid td, .grid th { border: none; padding: 2px; text-align: center; font-size: 12px; }
.grid img { width: 176px; height: 176px; object-fit: contain; image-rendering: auto; display: block; }
.grid .psnr { font-size: 11px; color: #555; font-variant-numeric: tabular-nums; }
.grid td.prompt { text-align: left; max-width: 140px; white-space: normal; }
.provenance td { white-space: normal; }
code, .mono { font-family: monospace; font-size: 12px; } .muted { color: #777; }
"""


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    step = (high - low) / count if high > low else 1.0
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step), default=step)
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def pareto_svg(
    name: str,
    points: list[tuple[str, float, float]],
    front: list[str],
    better: str,
    noise: dict[str, float] | None = None,
) -> str:
    """Scatter of ``(method, speedup, value)`` with the front in red, joined in speedup order; each dot with an
    error bar of its ``noise`` (by method) and a hover title, each label joined to its dot by a leader line."""
    noise = noise or {}
    width, height, left, right, top, bottom = 360, 270, 52, 16, 28, 40
    capped = [p for p in points if name == "PSNR" and p[2] >= PSNR_CAP_DB]
    shown = [p for p in points if p not in capped] or points
    x0, x1 = _range([p[1] for p in points])
    y0, y1 = _range([p[2] for p in shown])

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (min(y, y1) - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    arrow = "↑" if better == "higher" else "↓"
    parts.append(
        f'<text x="{width / 2}" y="17" text-anchor="middle" font-size="13">{html.escape(name)} {arrow} '
        "vs speedup</text>"
    )
    for tick in _ticks(x0, x1):
        parts.append(f'<line x1="{sx(tick):.1f}" x2="{sx(tick):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
        parts.append(
            f'<text x="{sx(tick):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">{tick:g}x</text>'
        )
    for tick in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{sy(tick) + 3:.1f}" text-anchor="end" font-size="10">{tick:.4g}</text>')
    parts.append(
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">speedup over full compute</text>'
    )
    by_name = {p[0]: p for p in points}
    line = " ".join(f"{sx(by_name[n][1]):.1f},{sy(by_name[n][2]):.1f}" for n in front)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far, so labels never overlap
    for method, x, y in sorted(points, key=lambda p: (sy(p[2]), sx(p[1]))):
        color = "#d62728" if method in front else "#1f77b4"
        cx, cy = sx(x), sy(y)
        is_capped = (method, x, y) in capped
        spread = noise.get(method)
        hover = f"{method}: {x:.2f}x, {name} {y:.4g}" + (f" ±{spread:.3g}" if spread else "")
        if spread and not is_capped:  # the value's noise as a vertical bar
            top_y, bottom_y = sy(min(y + spread, y1)), sy(max(y - spread, y0))
            parts.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{top_y:.1f}" y2="{bottom_y:.1f}" stroke="{color}" '
                'stroke-opacity="0.5"/>'
            )
        title = f"<title>{html.escape(hover)}</title>"
        if is_capped:  # off the scale: a triangle at the top edge
            parts.append(f'<path d="M{cx:.1f},{cy - 5:.1f} l5,9 h-10 z" fill="{color}">{title}</path>')
        else:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}">{title}</circle>')
        text = method + (" (identical)" if is_capped else "")
        box_width = 5.6 * len(text)
        right_half = cx > left + 0.6 * (width - left - right)
        bx = cx - 6 - box_width if right_half else cx + 6
        natural = ly = cy + 13 if is_capped else cy - 5
        while any(bx < b[1] and b[0] < bx + box_width and ly - 9 < b[3] and b[2] < ly + 1 for b in placed):
            ly += 11
        placed.append((bx, bx + box_width, ly - 9, ly + 1))
        if ly != natural:  # moved off its dot: a leader line from the label back to the dot
            edge = bx + box_width if right_half else bx
            parts.append(
                f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{edge:.1f}" y2="{ly - 3:.1f}" '
                'stroke="#999" stroke-width="0.7"/>'
            )
        parts.append(
            f'<text x="{bx:.1f}" y="{ly:.1f}" font-size="10"><title>{html.escape(hover)}</title>'
            f"{html.escape(text)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _thumbnail(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if max(image.size) > THUMBNAIL:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def animation_file(trial: dict, index: int) -> str:
    """Where the animation of clip ``index`` of ``trial`` goes, relative to the output folder."""
    return f"animations/{Path(trial['images']).name}/{index:05d}.webp"


def write_animations(results: dict, out: str | Path) -> list[Path]:
    """Every clip of every trial that ran as an animated WebP (:func:`animation_file`), skipping those on disk
    (a trial's folder name holds its key, so its clips never change); nothing for an image run. Returns the
    files written."""
    if sample_unit(results) != "clip":
        return []
    out, written = Path(out), []
    for trial in ok_trials(results):
        for strip in sorted((out / trial["images"]).glob("[0-9]*.png")):
            path = out / animation_file(trial, int(strip.stem))
            if not path.exists():
                save_animation(load_samples([strip])[0], path)
                written.append(path)
    return written


def _sample_psnr(trial: dict, index: int) -> str:
    """The PSNR of one image (clip) of ``trial`` against full compute's, as a caption; empty where not measured."""
    if trial["kind"] == "full":
        return "<div class='psnr'>reference</div>"
    per_sample = trial.get("metrics", {}).get("PSNR", {}).get("per_sample") or []
    if index >= len(per_sample):
        return ""
    value = per_sample[index]
    text = "identical" if value >= PSNR_CAP_DB else f"{value:.1f} dB"
    return f"<div class='psnr'>{text}</div>"


def _cell(out: Path, trial: dict, index: int, unit: str) -> str:
    """One grid cell: the image's thumbnail, or the clip's animation linking to its file, with its PSNR."""
    path = out / trial["images"] / f"{index:05d}.png"
    if not path.exists():
        return "missing"
    alt = html.escape(trial["method"])
    if unit != "clip":
        return f'<img src="{_thumbnail(path)}" alt="{alt}">' + _sample_psnr(trial, index)
    data = base64.b64encode(animation_bytes(load_samples([path])[0], THUMBNAIL, lossless=False)).decode()
    link = html.escape(animation_file(trial, index))
    return f'<a href="{link}"><img src="data:image/webp;base64,{data}" alt="{alt}"></a>' + _sample_psnr(trial, index)


def image_grid(results: dict, out: Path) -> str:
    """One row per prompt and seed (the first :data:`GRID_PROMPTS`), one column per method that ran, full compute
    first, each image with its PSNR against full compute's; clips as animations."""
    trials, unit = ok_trials(results), sample_unit(results)
    run = results["run"]
    prompts = run["config"]["prompts"][:GRID_PROMPTS]
    head = "".join(f"<th>{html.escape(t['method'])}</th>" for t in trials)
    rows = [f"<tr><th>prompt / seed</th>{head}</tr>"]
    for index, prompt in enumerate(prompts):
        cells = "".join(f"<td>{_cell(out, trial, index, unit)}</td>" for trial in trials)
        label = f"{html.escape(prompt)}<br><span class='muted'>seed {run['seeds'][index]}</span>"
        rows.append(f"<tr><td class='prompt'>{label}</td>{cells}</tr>")
    return f"<div class='scroll'><table class='grid'>{''.join(rows)}</table></div>"


def _rows_html(header: list[str], rows: list[list[str]], css: str = "") -> str:
    body = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    return f"<div class='scroll'><table class='{css}'>{''.join(body)}</table></div>"


def _decision(results: dict) -> str:
    """The lead: per quality floor the fastest method meeting it, and the noise note."""
    header, rows = decision_rows(results)
    if not rows:
        return "<p>No full-compute trial ran, so no method can be judged against it.</p>"
    return _rows_html(header, rows, "decision") + f"<p class='muted'>{html.escape(noise_note(results))}</p>"


def _table(results: dict) -> str:
    header, rows = summary_rows(results)
    picks = {floor.best["method"] for floor in floors(results) if floor.best is not None}
    statuses = {t["method"]: t.get("status") for t in results["trials"]}
    body = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        if statuses[row[0]] != "ok":
            body.append(
                f"<tr class='unsupported'><td>{html.escape(row[0])}</td>"
                f"<td colspan='{len(header) - 1}' style='text-align:left'>unsupported (see below)</td></tr>"
            )
            continue
        css = "pick" if row[0] in picks else ""
        body.append(f"<tr class='{css}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    note = "<p class='muted'>Bold: the fastest method at one of the quality floors above. ± as above.</p>"
    return f"<div class='scroll'><table>{''.join(body)}</table></div>{note}"


def _plots(results: dict, all_fronts: dict[str, list[str]]) -> str:
    """One plot per kind of metric (:func:`accel.eval.report.primary_metrics`), each value with its noise; a metric
    whose noise exceeds the differences between the methods is left out (the tables flag it)."""
    svgs, noisy = [], noisy_metrics(results)
    for name, front in all_fronts.items():
        if name in noisy:
            continue
        trials = [t for t in ok_trials(results) if value_of(t, name) is not None]
        points = [(t["method"], t["latency"]["speedup"], value_of(t, name)) for t in trials]
        noise = {t["method"]: n for t in trials if t["kind"] != "full" and (n := value_noise(results, t, name))}
        svgs.append(pareto_svg(name, points, front, metric_info(results, name).get("better", "higher"), noise))
    return f"<div class='plots'>{''.join(svgs)}</div>"


def _details(results: dict) -> str:
    items = []
    for name in metric_names(results):
        info = metric_info(results, name)
        text = f"unavailable: {info['unavailable']}" if info.get("value") is None else info["computed"]
        text += f" ({info['note']})" if info.get("note") else ""
        items.append(f"<li><b>{html.escape(name)}</b> ({info.get('better', '?')} is better): {html.escape(text)}</li>")
    unsupported = [
        f"<li><code>{html.escape(t['method'])}</code>: {html.escape(t['reason'])}</li>"
        for t in results["trials"]
        if t.get("status") != "ok"
    ]
    parts = ["<h2>Metrics</h2><ul>" + "".join(items) + "</ul>"]
    if results.get("noise"):
        noise = "".join(f"<li>{html.escape(line)}</li>" for line in noise_lines(results))
        parts.append(f"<h2>Run-to-run noise</h2><p>{html.escape(results['noise']['how'])}.</p><ul>{noise}</ul>")
    if unsupported:
        parts.insert(0, "<h2>Unsupported</h2><ul>" + "".join(unsupported) + "</ul>")
    return "".join(parts)


def _provenance(results: dict) -> str:
    run = results["run"]
    rows = {
        **run["versions"],
        "device": run["device"],
        "processes": run["num_processes"],
        "model": run["model"],
        "prompts": f"{run['prompts_source']} (file sha256 {run.get('prompts_file_sha256')})",
        "prompt list sha256": run["prompts_sha256"],
        "pipeline call": run["pipeline_call_kwargs"],
        "created": run["created"],
    }
    trial = next(iter(ok_trials(results)), None)
    if trial:
        rows["MACs"] = trial["macs"]["how"]
        rows["peak memory"] = trial["memory"]["what"]
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td class='mono' style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<h2>Provenance</h2><table class='provenance'>{cells}</table>"


def _grid_heading(results: dict) -> str:
    total = len(results["run"]["config"]["prompts"])
    shown = min(GRID_PROMPTS, total)
    what = "clips" if sample_unit(results) == "clip" else "images"
    which = f"All {total} prompts" if shown == total else f"The first {shown} of the {total} prompts"
    counts = (
        f"{which}, one seed each; full compute first; under each {what[:-1]} its PSNR against the full-compute one "
        "(the lower, the more it lost)."
    )
    if what == "images":
        return (
            f"<h2>Images: same prompt and seed across methods</h2><p class='muted'>{counts} Shown enlarged, "
            "smoothly scaled.</p>"
        )
    return (
        f"<h2>Clips: same prompt and seed across methods</h2><p class='muted'>{counts} Each clip loops "
        "(animated WebP, quality 95); click one for its lossless file.</p>"
    )


def html_report(results: dict, out: str | Path) -> str:
    """The whole page; image files are read from ``out`` and embedded."""
    all_fronts = fronts(results)
    timing = results["run"]["config"]["timing"]
    body = [
        "<h1>Quality vs speed</h1>",
        f"<p>{html.escape(run_summary(results))}</p>",
        "<h2>Which method to use</h2>",
        _decision(results),
        "<h2>All methods</h2>",
        _table(results),
        f"<p class='muted'>Speedup: median latency of full compute over the method's, timed interleaved in one process "
        f"({timing['warmup']} warm-up, {timing['repeats']} timed rounds, batch {timing['batch']}).</p>",
        "<h2>Quality vs speed (Pareto fronts in red; bars: noise; hover a dot for its numbers)</h2>",
        _plots(results, all_fronts),
        _grid_heading(results),
        image_grid(results, Path(out)),
        token_heat_maps(results),
        _details(results),
        _provenance(results),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>accel: quality vs speed</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
