"""Which method to use: the report's lead, from ``results.json`` alone.

For a few quality floors (mean PSNR of at least 40, 35 and 30 dB against full compute; FID and the prompt score
within the noise of full compute) the fastest method that meets each, and whether it beats plain fewer steps
(``steps-N``) there. A number counts as within noise when it is worse than full compute's by at most the noise
of the difference (:func:`difference_noise`): the run-to-run spread where the run measured one
(``--noise-seed-sets``), else twice the standard error from this run's images (paired with full compute per prompt
where the metric has per-image values, a bootstrap over the images for FID). A metric whose noise exceeds the
spread between the methods is flagged (:func:`noise_dominated`): it cannot rank them on this many images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

PSNR_FLOORS = (40.0, 35.0, 30.0)


def family(name: str) -> str:
    """What a metric measures: ``"fidelity"`` (PSNR, SSIM, LPIPS: against full compute, image by image),
    ``"distribution"`` (FID, KID), ``"motion"``, or ``"prompt"`` (CLIP score or the bundled alignment score)."""
    if name in ("PSNR", "SSIM") or name.startswith("LPIPS"):
        return "fidelity"
    if name.startswith(("FID", "KID")):
        return "distribution"
    if name.startswith("motion"):
        return "motion"
    return "prompt"


def ok_trials(results: dict) -> list[dict]:
    """Trials that ran."""
    return [t for t in results["trials"] if t.get("status") == "ok"]


def full_trial(results: dict) -> dict | None:
    """The full-compute trial, if it ran."""
    return next((t for t in ok_trials(results) if t["kind"] == "full"), None)


def value(trial: dict, name: str) -> float | None:
    """A trial's value of metric ``name`` (None: not measured)."""
    return trial.get("metrics", {}).get(name, {}).get("value")


def value_noise(results: dict, trial: dict, name: str) -> float | None:
    """The noise of one trial's number: the run-to-run spread where measured, else twice its standard error."""
    measured = results.get("noise", {}).get("noise", {}).get(name) if results.get("noise") else None
    if measured is not None:
        return measured
    se = trial.get("metrics", {}).get(name, {}).get("se")
    return None if se is None else 2 * se


def difference_noise(results: dict, trial: dict, full: dict, name: str) -> float | None:
    """The noise of ``trial``'s difference from full compute in metric ``name``: the run-to-run spread where
    measured; else twice the paired standard error of the per-image differences where both have per-image
    values; else twice the combined standard error; None where nothing says."""
    measured = results.get("noise", {}).get("noise", {}).get(name) if results.get("noise") else None
    if measured is not None:
        return measured
    mine, theirs = trial["metrics"].get(name, {}), full["metrics"].get(name, {})
    a, b = mine.get("per_sample"), theirs.get("per_sample")
    if a and b and len(a) == len(b) > 1:
        differences = [x - y for x, y in zip(a, b)]
        mean = sum(differences) / len(differences)
        variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
        return 2 * math.sqrt(variance / len(differences))
    if mine.get("se") is not None and theirs.get("se") is not None:
        return 2 * math.hypot(mine["se"], theirs["se"])
    return None


def within_noise(results: dict, trial: dict, full: dict, name: str) -> bool:
    """Whether ``trial`` is worse than full compute in ``name`` by at most the noise (better is within); False
    where the noise is unknown."""
    noise = difference_noise(results, trial, full, name)
    mine, theirs = value(trial, name), value(full, name)
    if noise is None or mine is None or theirs is None:
        return False
    better = full["metrics"][name].get("better", "higher")
    return mine >= theirs - noise if better == "higher" else mine <= theirs + noise


def noise_dominated(results: dict, name: str) -> bool:
    """Whether the methods' differences in ``name`` are within its noise: the spread of the methods' values
    (full compute left out: it is the reference of the fidelity metrics) is at most the median noise."""
    full = full_trial(results)
    trials = [t for t in ok_trials(results) if t is not full and value(t, name) is not None]
    if full is None or len(trials) < 2:
        return False
    noises = [n for t in trials if (n := difference_noise(results, t, full, name)) is not None]
    values = [value(t, name) for t in trials]
    return bool(noises) and max(values) - min(values) <= median(noises)


@dataclass(frozen=True)
class Floor:
    """One quality floor and what meets it.

    Attributes:
        label: e.g. ``"PSNR >= 35 dB"``.
        best: the fastest trial meeting it (full compute if nothing faster does), or None.
        best_steps: the fastest plain fewer-steps trial meeting it, or None.
        has_steps: whether the run has any ``steps-N`` trial.
    """

    label: str
    best: dict | None
    best_steps: dict | None
    has_steps: bool

    def verdict(self) -> str:
        """One sentence on fewer steps there."""
        if self.best is None:
            return "nothing meets it"
        if self.best["kind"] == "full":
            return "no method is faster than full compute at this floor"
        if self.best["kind"] == "steps":
            return "plain fewer steps is the fastest here: no caching method beats it"
        if self.best_steps is not None:
            steps = self.best_steps
            return f"beats plain fewer steps ({steps['method']}: {steps['latency']['speedup']:.2f}x)"
        return "no steps-N in this run meets it" if self.has_steps else "no steps-N in this run to compare with"


def floors(results: dict) -> list[Floor]:
    """The report's quality floors with the fastest method meeting each (see the module docstring)."""
    full = full_trial(results)
    if full is None:
        return []
    trials = ok_trials(results)
    names = {t_name for t in trials for t_name in t.get("metrics", {}) if value(t, t_name) is not None}
    tests: list[tuple[str, object]] = []
    if "PSNR" in names:
        for floor in PSNR_FLOORS:
            tests.append((f"PSNR >= {floor:g} dB", lambda t, f=floor: (value(t, "PSNR") or -math.inf) >= f))
    judged = [
        next((n for n in sorted(names) if family(n) == kind and n.startswith(prefix)), None)
        for kind, prefix in (("distribution", "FID"), ("prompt", ""))
    ]
    judged = [n for n in judged if n is not None]
    for name in judged:
        tests.append((f"{name} within noise of full compute", lambda t, n=name: within_noise(results, t, full, n)))
    if len(judged) > 1:
        label = " and ".join(judged) + " both within noise"
        tests.append((label, lambda t: all(within_noise(results, t, full, n) for n in judged)))
    has_steps = any(t["kind"] == "steps" for t in trials)
    found = []
    for label, meets in tests:
        passing = [t for t in trials if t["kind"] == "full" or meets(t)]
        best = max(passing, key=lambda t: t["latency"]["speedup"], default=None)
        steps = [t for t in passing if t["kind"] == "steps"]
        found.append(Floor(label, best, max(steps, key=lambda t: t["latency"]["speedup"], default=None), has_steps))
    return found
