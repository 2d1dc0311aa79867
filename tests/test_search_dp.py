"""Schedule search, pure parts: the DP schedulers, constraint repair, genomes, fronts, durations."""

import itertools

import numpy as np
import pytest

from accel.caching import ScheduleLayout, fora, tgate
from accel.caching.search import Constraints, Front, cachequant_mask, optimal_refresh_steps, parse_duration, repair
from accel.caching.search.dp import bac_mask, bubbling_union, reuse_error
from accel.caching.search.front import non_dominated
from accel.caching.search.genome import Encoding, satisfies
from accel.caching.search.latency import LatencyModel, latency_features

LAYOUT = ScheduleLayout(
    model_class="PixArtTransformer2DModel", num_blocks=4, components=("self_attn", "cross_attn", "ffn")
)


def random_change(rng, steps):
    """A change matrix of random features: change[i, j] = |f_j - f_i|_1 / |f_j|_1."""
    features = np.cumsum(rng.normal(size=(steps, 16)), axis=0)
    distance = np.abs(features[:, None] - features[None]).sum(-1)
    return distance / np.abs(features).sum(-1)[None]


def brute_force(change, num_updates, forced):
    steps = len(change)
    best, best_mask = np.inf, None
    for rest in itertools.combinations(range(1, steps), num_updates - 1):
        refresh = np.zeros(steps, dtype=bool)
        refresh[[0, *rest]] = True
        if not refresh[forced].all():
            continue
        cost = reuse_error(change, refresh)
        if cost < best - 1e-12:
            best, best_mask = cost, refresh
    return best, best_mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_updates", [1, 2, 3, 5])
def test_dp_refresh_steps_match_brute_force(seed, num_updates):
    change = random_change(np.random.default_rng(seed), 8)
    forced = [0] if num_updates < 3 else [0, 7]
    best, _ = brute_force(change, num_updates, forced)
    mask = optimal_refresh_steps(change, num_updates, forced)
    assert mask.sum() == num_updates and mask[forced].all()
    assert reuse_error(change, mask) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_dp_finds_phase_starts_with_zero_error():
    # features constant within phases starting at steps 0, 3 and 7: refreshing there reuses exactly
    phase = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    change = (phase[:, None] != phase[None]).astype(float)
    mask = optimal_refresh_steps(change, 3)
    assert np.flatnonzero(mask).tolist() == [0, 3, 7]
    assert reuse_error(change, mask) == 0.0
    with pytest.raises(ValueError, match="num_updates"):
        optimal_refresh_steps(change, 1, forced=[0, 5])


def test_cachequant_mask_refreshes_all_components_at_the_weighted_optimum():
    rng = np.random.default_rng(0)
    change = np.stack([[random_change(rng, 6) for _ in range(3)] for _ in range(4)])  # (4, 3, 6, 6)
    weights = rng.uniform(0.5, 2.0, size=(4, 3))
    mask = cachequant_mask(change, 3, weights)
    assert mask.shape == (6, 4, 3)
    assert (mask == mask[:, :1, :1]).all()  # one set of steps for everything
    total = np.einsum("bc,bcij->ij", weights, change)
    assert reuse_error(total, mask[:, 0, 0]) == pytest.approx(brute_force(total, 3, [0])[0])


def test_bac_union_bubbles_ffn_refreshes_upstream():
    steps = 6
    mask = np.zeros((steps, 3, 3), dtype=bool)
    mask[0] = True
    mask[2, 2, 2] = True  # the last block's FFN refreshes at step 2
    mask[4, 1, 2] = True  # the middle block's FFN at step 4
    errors = np.zeros((3, 3))
    errors[2, 0] = errors[1, 2] = errors[0, 1] = 1.0  # significant: last self-attn, middle FFN, first cross-attn
    result = bubbling_union(mask, errors, ffn=2, threshold=0.5)
    assert (result >= mask).all()
    assert result[2, 2, 0]  # same block, before the FFN
    assert result[2, 1, 2] and result[4, 1, 2]  # previous block's FFN takes step 2 too
    assert result[2, 0, 1] and result[4, 0, 1]  # ... and passes both on upwards: bubbling
    assert not result[2, 2, 1] and not result[2, 1, 0]  # insignificant components keep their own steps
    assert not result[:, :, :][[1, 3, 5]].any()


def test_bac_mask_budget_per_component():
    rng = np.random.default_rng(1)
    change = np.stack([[random_change(rng, 8) for _ in range(3)] for _ in range(3)])
    plain = bac_mask(change, 3, ffn=None)
    assert (plain.sum(axis=0) == 3).all() and plain[0].all()
    unioned = bac_mask(change, 3, ffn=2, union_quantile=0.5)
    assert (unioned >= plain).all() and unioned.sum() > plain.sum()


def test_repair_forces_steps_and_caps_reuse_runs():
    constraints = Constraints(first_steps=2, last_steps=1, max_consecutive_reuse=2)
    mask = np.zeros((10, 2, 3), dtype=bool)
    mask[0] = True
    fixed = repair(mask, constraints)
    assert fixed[[0, 1, 9]].all()
    for column in fixed.reshape(10, -1).T:  # no reuse run longer than 2
        runs = "".join("1" if v else "0" for v in column).split("1")
        assert max(len(r) for r in runs) <= 2
    assert np.flatnonzero(fixed[:, 0, 0]).tolist() == [0, 1, 4, 7, 9]  # runs cut as late as allowed
    assert satisfies(fixed, constraints) and np.array_equal(repair(fixed, constraints), fixed)
    assert not mask[1:].any() and not fixed[2:4].any()  # input untouched, reuse kept where allowed
    with pytest.raises(ValueError, match="first_steps"):
        Constraints(first_steps=0)


def test_genome_round_trip():
    encoding = Encoding(layout=LAYOUT, num_steps=7)
    schedule = tgate(LAYOUT, 7)
    genome = encoding.from_schedule(schedule)
    assert genome.shape == (encoding.length,) == (6 * 4 * 3,)
    back = encoding.schedule(genome, generator="test")
    assert np.array_equal(back.mask, schedule.mask) and back.reuse == "residual" and back.forecast_order == 0
    rng = np.random.default_rng(0)
    random_genome = rng.random(genome.shape) < 0.5
    assert np.array_equal(encoding.from_schedule(encoding.schedule(random_genome)), random_genome)
    assert encoding.mask(random_genome)[0].all()
    assert np.array_equal(
        encoding.from_schedule(fora(LAYOUT, 14, 2)), encoding.from_schedule(fora(LAYOUT, 14, 2).resample(7))
    )
    assert encoding.from_schedule(fora(LAYOUT, 7, 2, forecast_order=1)).tolist() == genome_of_fora_2(encoding)
    with pytest.raises(ValueError, match="genes"):
        encoding.mask(genome[:-1])


def genome_of_fora_2(encoding):
    mask = np.zeros(encoding.mask_shape, dtype=bool)
    mask[::2] = True
    return mask[1:].reshape(-1).tolist()


def test_genome_forecast_order_genes():
    encoding = Encoding(layout=LAYOUT, num_steps=7, forecast_orders=(0, 1, 2))
    assert encoding.length == encoding.mask_genes + 2
    schedule = fora(LAYOUT, 7, 2, forecast_order=1)
    genome = encoding.from_schedule(schedule)
    assert genome[encoding.mask_genes :].tolist() == [True, False] and encoding.forecast_order(genome) == 1
    assert encoding.schedule(genome).forecast_order == 1 and np.array_equal(encoding.mask(genome), schedule.mask)
    moved = genome.copy()
    moved[-1] = True  # one more order gene set: the next order
    assert encoding.forecast_order(moved) == 2
    moved[encoding.mask_genes] = False
    assert encoding.forecast_order(moved) == 1  # the count of set genes picks the order, not their place
    empty = np.zeros(encoding.mask_shape, dtype=bool)
    kept = encoding.with_mask(moved, empty)
    assert encoding.forecast_order(kept) == 1 and not kept[: encoding.mask_genes].any()
    assert encoding.from_schedule(fora(LAYOUT, 7, 2, forecast_order=4))[encoding.mask_genes :].tolist() == [0, 0]
    with pytest.raises(ValueError, match="not one of"):
        encoding.genome(empty, forecast_order=3)
    with pytest.raises(ValueError, match="distinct"):
        Encoding(layout=LAYOUT, num_steps=7, forecast_orders=(1, 1))


def test_non_dominated_and_pick():
    objectives = np.array([[1.0, -40], [0.5, -30], [0.6, -25], [0.3, -20], [0.3, -20]])
    assert non_dominated(objectives).tolist() == [True, True, False, True, False]
    members = [
        fora(LAYOUT, 6, n).with_metrics(ideal_speedup=s, psnr=p)
        for n, s, p in [(1, 1.0, 100.0), (2, 1.9, 35.0), (3, 2.6, 30.0), (4, 3.2, 22.0)]
    ]
    front = Front(schedules=tuple(reversed(members)))
    assert [m.metrics["ideal_speedup"] for m in front] == [1.0, 1.9, 2.6, 3.2]
    assert front.pick(target_speedup=2.5).metrics["psnr"] == 30.0
    assert front.pick(target_speedup=5.0).metrics["ideal_speedup"] == 3.2  # none that fast: the fastest
    assert front.pick(min_psnr=33.0).metrics["ideal_speedup"] == 1.9
    assert front.pick(target_speedup=1.5, num_steps=12).num_steps == 12
    with pytest.raises(ValueError, match="exactly one"):
        front.pick()


def test_latency_features_count_what_the_engine_runs():
    mask = np.ones((3, 2, 3), dtype=bool)
    mask[1] = False  # step 1: both blocks skipped whole
    mask[2, 0, 1] = False  # step 2: block 0 reuses its cross-attention
    present = np.ones((2, 3), dtype=bool)
    steps, blocks_run, *per_component, forecasts = latency_features(mask, present)
    assert (steps, blocks_run, forecasts) == (3, 4, 0)
    assert per_component == [4, 3, 4, 0, 1, 0]  # computed per component, then reused inside run blocks
    mask[2, 1] = False  # step 2: block 1 skipped whole beside block 0
    # order 2 forecasts: the stack's sum at step 1, block 0's cross-attention and block 1 at step 2
    assert latency_features(mask, present, forecast_order=2)[-1] == 2 * (1 + 1 + 1)
    model = LatencyModel(coefficients=np.array([1.0, 2.0, 0, 0, 0, 0, 0, 0, 0.5]), present=present)
    assert model.seconds(mask) == 3 + 6 and model.relative(mask) == pytest.approx(9 / 15)
    assert model.seconds(mask, forecast_order=1) == 3 + 6 + 1.5
    assert LatencyModel.from_dict(model.to_dict()).seconds(mask, 1) == model.seconds(mask, 1)
    old = {**model.to_dict(), "version": 1, "coefficients": [1.0, 2.0, 0, 0, 0, 0, 0, 0]}
    assert LatencyModel.from_dict(old).seconds(mask, forecast_order=2) == 3 + 6  # no forecast term then


def test_parse_duration():
    assert parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="give a unit: 90s, 90m or 90h"):
        parse_duration("90")  # read as minutes before: --budget 90 ran for an hour and a half
    with pytest.raises(ValueError, match="30m"):
        parse_duration("soon")


def test_ramp_seeds_compute_early_steps_densely():
    from accel.caching.search.seeds import ramp_schedules

    layout = ScheduleLayout(model_class="X", num_blocks=2, components=("self_attn", "ffn"))
    ramps = ramp_schedules(layout, 20)
    assert 10 <= len(ramps) <= 2 * 7  # 4..10 computes, two powers (rounding merges a few)
    capped = ramp_schedules(layout, 20, max_reuse=4)
    assert 0 < len(capped) < len(ramps)
    for schedule in capped.values():
        assert satisfies(schedule.mask, Constraints(max_consecutive_reuse=4))
    assert np.flatnonzero(capped["ramp-5-p1.5"].mask[:, 0, 0]).tolist() == [0, 2, 5, 10, 15]
    assert ramp_schedules(layout, 20, max_reuse=30).keys() == ramps.keys()  # a cap beyond reach: no cap
    for schedule in [*ramps.values(), *capped.values()]:
        steps = np.flatnonzero(schedule.mask[:, 0, 0])
        assert steps[0] == 0 and schedule.mask[steps].all() and not schedule.mask[~schedule.mask[:, 0, 0]].any()
        gaps = np.diff(steps)
        assert (np.diff(gaps) >= -1).all() and gaps[-1] >= gaps[0]  # wider later (up to rounding)


def test_structured_swap_moves_computes_in_time_at_equal_cost():
    from accel.caching.search.config import SearchConfig
    from accel.caching.search.nsga import GeneticSearch

    layout = ScheduleLayout(model_class="X", num_blocks=3, components=("self_attn", "ffn"))
    search = GeneticSearch.__new__(GeneticSearch)  # only the mutation operator, no evaluator
    search.encoding = Encoding(layout=layout, num_steps=12)
    assert search.length == 11 * 3 * 2
    search.config = SearchConfig(generations=1, mutation_rate=1e-9, structured_mutation=1.0)
    mask = fora(layout, 12, 3).mask
    genome = mask[1:].reshape(-1)
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(200):
        child = search.mutate(genome.copy(), rng).reshape(11, 3, 2)
        if child.sum() == genome.sum() and not np.array_equal(child.reshape(-1), genome):
            moved += 1
    assert moved > 20  # swaps (about 2 in 5 moves) keep the number of computes
