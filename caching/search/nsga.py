"""NSGA-II over compute masks with pymoo, checkpointed every generation so that a stopped run resumes exactly.

The loop uses pymoo's ask/tell interface; this module supplies the problem (binary genome, two minimised
objectives: cost and ``-psnr``), the constraint repair, a mutation that adds whole-step / whole-column moves
to bit flips, and candidate evaluation with an archive: a genome is never run twice with the same prompt
count. Every generation is checkpointed (:mod:`accel.caching.search.checkpoint`), and a run resumed from the
checkpoint continues bit-identically to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from accel.caching.schedule import Schedule, ScheduleLayout
from accel.caching.search.archive import Archive
from accel.caching.search.checkpoint import CheckpointedSearch
from accel.caching.search.config import SearchConfig
from accel.caching.search.evaluator import Evaluator
from accel.caching.search.genome import Encoding, repair
from accel.caching.search.workers import Workers

logger = logging.getLogger(__name__)

#: random initial genomes drawn in a row without a new one before the constraints are taken to allow no more
MAX_FRUITLESS_DRAWS = 1000


def _pymoo() -> SimpleNamespace:
    """The pymoo classes the search uses (pymoo is an optional dependency, imported on first use)."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.evaluator import Evaluator as PymooEvaluator
        from pymoo.core.mutation import Mutation
        from pymoo.core.population import Population
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair
        from pymoo.operators.crossover.pntx import TwoPointCrossover
        from pymoo.problems.static import StaticProblem
    except ImportError as error:
        raise ImportError("accel search needs pymoo: pip install 'diffusers-accel[search]'") from error
    return SimpleNamespace(
        NSGA2=NSGA2,
        PymooEvaluator=PymooEvaluator,
        Mutation=Mutation,
        Population=Population,
        Problem=Problem,
        Repair=Repair,
        TwoPointCrossover=TwoPointCrossover,
        StaticProblem=StaticProblem,
    )


class BudgetExhausted(Exception):
    """The time budget ran out in the middle of a generation (what was evaluated is in the archive)."""


class GeneticSearch(CheckpointedSearch):
    """One NSGA-II search; :meth:`run` resumes from ``out_dir`` when it holds a checkpoint of the same search.

    Args:
        evaluator: scores schedules (its prompts, steps and pipeline define the search).
        config: the search settings.
        out_dir: where the checkpoint lives.
        seeds: schedules for the initial population by name (heuristics, DP), repaired to the constraints.
    """

    def __init__(self, evaluator: Evaluator, config: SearchConfig, out_dir: str | Path, seeds: dict[str, Schedule]):
        self.evaluator, self.config, self.out_dir = evaluator, config, Path(out_dir)
        self.encoding = Encoding(
            layout=evaluator.layout, num_steps=config.evaluation.num_steps, forecast_orders=config.forecast_orders
        )
        self.archive = Archive()
        self.generation = 0
        self.elapsed = 0.0
        self.seeds = dict(seeds)
        self.seed_names: dict[bytes, str] = {}
        self.workers = Workers()
        self.exhaustive = False  # set by initial_genomes: the initial population holds every genome there is
        self.autosave_seconds = 60.0
        self._snapshot: dict | None = None
        self._last_save = time.perf_counter()
        self._algorithm = self._build()

    @property
    def layout(self) -> ScheduleLayout:
        """The model's schedule layout."""
        return self.encoding.layout

    @property
    def steps(self) -> int:
        """Denoising steps of every schedule searched."""
        return self.encoding.num_steps

    @property
    def length(self) -> int:
        """Genes per genome."""
        return self.encoding.length

    # -- pymoo plumbing ----------------------------------------------------------------------------------

    def _build(self):
        p = _pymoo()
        search = self

        class ScheduleProblem(p.Problem):
            def __init__(self):
                super().__init__(n_var=search.length, n_obj=2, xl=0, xu=1, vtype=bool)

        class ConstraintRepair(p.Repair):
            def _do(self, problem, X, **kwargs):
                return np.array([search.repair_genome(x) for x in X], dtype=bool)

        class MaskMutation(p.Mutation):
            def _do(self, problem, X, random_state=None, **kwargs):
                return np.array([search.mutate(x, random_state) for x in X], dtype=bool)

        self._problem = ScheduleProblem()
        algorithm = p.NSGA2(
            pop_size=self.config.population,
            sampling=self.initial_genomes(),
            crossover=p.TwoPointCrossover(),
            mutation=MaskMutation(),
            repair=ConstraintRepair(),
            eliminate_duplicates=True,
        )
        algorithm.setup(self._problem, seed=self.config.seed, termination=("n_gen", 10**9), verbose=False)
        return algorithm

    def origin(self, genome: np.ndarray) -> str:
        """The seed a genome is (e.g. ``"fora-2"``), or ``"evolved"``."""
        return self.seed_names.get(np.packbits(genome).tobytes(), "evolved")

    def repair_genome(self, genome: np.ndarray) -> np.ndarray:
        """The genome with the constraints enforced."""
        return self.encoding.with_mask(genome, repair(self.encoding.mask(genome), self.config.constraints))

    def mutate(self, genome: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Bit flips, plus with probability ``structured_mutation`` one structured move: a whole step, a run of
        blocks or a component over a run of steps flips, two nearby steps (all components, or one) swap, which
        moves computes in time at the same cost, or (with several forecast orders) the order moves by one."""
        rate = self.config.mutation_rate or 2.0 / self.length
        genome = genome ^ (rng.random(self.length) < rate)
        if rng.random() < self.config.structured_mutation:
            mask = self.encoding.mask(genome)
            step = int(rng.integers(1, self.steps))
            move = int(rng.integers(5 if self.length == self.encoding.mask_genes else 6))
            if move == 5:  # the forecast order moves to a neighbour
                genome = genome.copy()
                genome[int(rng.integers(self.encoding.mask_genes, self.length))] ^= True
                return genome
            if move == 0:  # a whole step computes or reuses
                mask[step] = not mask[step].mean() >= 0.5
            elif move == 1:  # a run of blocks at one step flips
                start = int(rng.integers(self.layout.num_blocks))
                stop = int(rng.integers(start + 1, self.layout.num_blocks + 1))
                mask[step, start:stop] = ~mask[step, start:stop]
            elif move == 2:  # one component over a run of steps
                component, stop = int(rng.integers(mask.shape[2])), int(rng.integers(step + 1, self.steps + 1))
                mask[step:stop, :, component] = not mask[step:stop, :, component].mean() >= 0.5
            else:  # swap with a step up to 2 away (not step 0): a whole step, or one component's column
                other = min(max(1, step + int(rng.choice([-2, -1, 1, 2]))), self.steps - 1)
                columns = slice(None) if move == 3 else int(rng.integers(mask.shape[2]))
                mask[[step, other], :, columns] = mask[[other, step], :, columns]
            genome = self.encoding.with_mask(genome, mask)
        return genome

    def initial_genomes(self) -> np.ndarray:
        """Seeds (repaired, deduplicated) then random masks of random density, ``population`` of them, or all there
        are: when the constraints leave fewer distinct genomes (e.g. ``first_steps`` covering every step), random
        draws stop after :data:`MAX_FRUITLESS_DRAWS` in a row found nothing new, and :attr:`exhaustive` is set."""
        rng = np.random.default_rng(self.config.seed)
        genomes, seen = [], set()
        candidates = [(name, self.encoding.from_schedule(s)) for name, s in self.seeds.items()]
        fruitless = 0
        while (len(genomes) < self.config.population and fruitless < MAX_FRUITLESS_DRAWS) or candidates:
            if candidates:
                name, genome = candidates.pop(0)
                genome = self.repair_genome(genome)
                self.seed_names.setdefault(np.packbits(genome).tobytes(), name)
            else:
                genome = self.repair_genome(rng.random(self.length) < rng.uniform(0.15, 0.9))
            key = genome.tobytes()
            if key in seen:
                fruitless += 1
                continue
            fruitless = 0
            seen.add(key)
            genomes.append(genome)
        self.exhaustive = len(genomes) < self.config.population
        if self.exhaustive:
            logger.warning(
                "the constraints leave only %d distinct schedules (population %d): evaluating them all, no evolution",
                len(genomes),
                self.config.population,
            )
        return np.array(genomes, dtype=bool)

    def _set_objectives(self, pop, objectives: np.ndarray) -> None:
        p = _pymoo()
        p.PymooEvaluator().eval(
            p.StaticProblem(self._problem, F=objectives), pop, skip_already_evaluated=False, count_evals=False
        )

    # -- evaluation --------------------------------------------------------------------------------------

    def evaluate(self, genomes: np.ndarray, prompts: int, deadline: float | None, progress=None) -> np.ndarray:
        """Objectives ``(n, 2)`` of ``genomes`` on ``prompts`` prompts, from the archive where possible.

        Raises:
            BudgetExhausted: the deadline passed before all were evaluated.
        """
        missing = [g for g in genomes if self.archive.get(g, prompts) is None]
        unique = list({g.tobytes(): g for g in missing}.values())

        def score(genome: np.ndarray):
            schedule = self.encoding.schedule(genome)
            metrics = self.evaluator.measure(schedule, prompts)
            return self.evaluator.objectives(metrics), metrics

        for genome, (objectives, metrics) in self.workers.map(score, unique, deadline, progress):
            self.archive.add(genome, prompts, objectives, metrics)
            if time.perf_counter() - self._last_save > self.autosave_seconds:
                self.save()
        if any(self.archive.get(g, prompts) is None for g in genomes):
            raise BudgetExhausted
        return np.array([self.archive.get(g, prompts)[0] for g in genomes])

    # -- pymoo's side of a checkpoint ---------------------------------------------------------------------

    def _restore_population(self, state: dict, arrays: dict) -> None:
        """Put the checkpoint's population, with its ranks and crowding, and pymoo's random state back."""
        p = _pymoo()
        algorithm = self._algorithm
        pop = p.Population.new(X=arrays["population"])
        self._set_objectives(pop, arrays["population_objectives"])
        pop.set("rank", arrays["population_rank"], "crowding", arrays["population_crowding"])
        algorithm.pop, algorithm.is_initialized, algorithm.n_iter = pop, True, state["n_iter"]
        algorithm.start_time = time.time()
        algorithm._set_optimum()
        algorithm.random_state.bit_generator.state = state["random_state"]
        self.generation = state["generation"]
        self.snapshot()

    # -- the loop ----------------------------------------------------------------------------------------

    def _rescore_population(self, prompts: int, deadline: float | None, progress) -> None:
        algorithm = self._algorithm
        pop = algorithm.pop
        self._set_objectives(pop, self.evaluate(pop.get("X").astype(bool), prompts, deadline, progress))
        algorithm.pop = algorithm.survival.do(
            self._problem, pop, n_survive=len(pop), algorithm=algorithm, random_state=algorithm.random_state
        )

    def step(self, deadline: float | None, progress=None) -> None:
        """Run one generation (the first one evaluates the initial population) and checkpoint."""
        algorithm, total = self._algorithm, len(self.evaluator.prompts)
        prompts = self.config.prompts_at(self.generation, total)
        if self.generation > 0 and prompts != self.config.prompts_at(self.generation - 1, total):
            self._rescore_population(prompts, deadline, progress)
        offspring = algorithm.ask()
        objectives = self.evaluate(offspring.get("X").astype(bool), prompts, deadline, progress)
        self._set_objectives(offspring, objectives)
        algorithm.tell(infills=offspring)
        self.generation += 1

    def run(self, resume: bool = True) -> list[tuple[np.ndarray, dict]]:
        """Search until the generation count or budget is reached; returns the final front as (genome, metrics)."""
        from tqdm.auto import tqdm

        if resume:
            self.load()
        started = time.perf_counter() - self.elapsed
        budget = self.config.budget_seconds
        deadline = None if budget is None else started + budget
        progress = tqdm(desc="search", unit="candidate", disable=not self.workers.is_main)
        try:
            while self.config.generations is None or self.generation < self.config.generations:
                if self.exhaustive and self.generation >= 1:  # all genomes evaluated: offspring would repeat them
                    break
                if self.workers.agree(deadline is not None and time.perf_counter() >= deadline):
                    break
                progress.set_postfix(generation=self.generation)
                try:
                    self.step(deadline, progress)
                except BudgetExhausted:
                    break
                self.snapshot()
                self.elapsed = time.perf_counter() - started
                self.save()
        finally:  # also on Ctrl-C or an error: keep every evaluation made since the last generation
            progress.close()
            self.elapsed = time.perf_counter() - started
            self.save()
        if self.generation == 0:
            raise ValueError("the budget ran out before the initial population was evaluated; give more time")
        front = self.final_front(deadline=None)
        self.save()  # the front's evaluations on all prompts
        return front

    def final_front(self, deadline: float | None) -> list[tuple[np.ndarray, dict]]:
        """Non-dominated members of the last population, scored on all prompts, at most ``max_front``."""
        from accel.caching.search.front import non_dominated

        genomes = self._algorithm.pop.get("X").astype(bool)
        objectives = self.evaluate(genomes, len(self.evaluator.prompts), deadline)
        keep = non_dominated(objectives)
        genomes, objectives = genomes[keep], objectives[keep]
        order = np.argsort(objectives[:, 0])
        if len(order) > self.config.max_front:
            order = order[np.unique(np.linspace(0, len(order) - 1, self.config.max_front).round().astype(int))]
        total = len(self.evaluator.prompts)
        return [(genomes[i], self.archive.get(genomes[i], total)[1]) for i in order]
