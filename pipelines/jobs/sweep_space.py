"""The settings of `bertflow sweep` and its search space: parsed and checked once, light to import.

A space maps fine-tune settings (fields of `FinetuneConfig`) to a domain:

    learning_rate: {loguniform: [1.0e-5, 1.0e-4]}   sampled: log-uniform in [low, high]
    warmup_ratio:  {uniform: [0.0, 0.2]}            sampled: uniform in [low, high]
    batch_size:    {choice: [16, 32]}               sampled: one of the values
    epochs:        {grid: [2, 3, 4]}                every value: an axis of the grid

`expand` turns a space into the sweep's trials, deterministically: every point of the grid axes,
`num_samples` times over, the sampled settings drawn from a generator seeded with `search_seed`
(Ray Tune's meaning of `grid_search` and `num_samples`). A sweep re-run into the same dir so
recomputes the same trials under the same names (`trial-000`, ...), which is how a killed sweep
finds the trials it already finished. `--grid paper` is the BERT paper's grid (section A.3):
batch size {16, 32} x learning rate {5e-5, 3e-5, 2e-5} x epochs {2, 3, 4}, 18 trials.

Every value is checked against the setting's type and `FinetuneConfig`'s own checks before
anything runs; a bad space is an `InputError` naming the file (or spec stage) and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert.errors import InputError
from pipelines.config_args import check_value
from pipelines.jobs.configs import FinetuneConfig, parse_seeds, result_settings, run_only

DOMAINS = ("choice", "grid", "uniform", "loguniform")
# inputs, outputs, tracking, resources and logging: the same for every trial, never swept
NOT_SWEEPABLE = ("task", "data", "checkpoint", "out", "tokenizer", "seeds", "tracking_uri", "parent_run_id",
                 "experiment", "log_model", "eval_batch_size", "max_eval_examples", "precision", "num_workers",
                 "cpus_per_worker", "threads_per_worker", "use_gpu", "max_failures", "log_every")
SHORT_NAMES = {"learning_rate": "lr", "batch_size": "batch", "epochs": "epochs", "warmup_ratio": "warmup",
               "weight_decay": "wd", "layer_lr_decay": "lld", "length_grouping": "group"}


@dataclass(frozen=True)
class Dimension:
    """One swept setting: `choice`/`grid` hold the values, `uniform`/`loguniform` hold (low, high)."""

    kind: str
    values: tuple

    def sample(self, rng) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        low, high = self.values
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))

    def to_dict(self) -> dict[str, list]:
        return {self.kind: list(self.values)}


Space = dict[str, Dimension]

PAPER_GRID: Space = {
    "batch_size": Dimension("grid", (16, 32)),
    "learning_rate": Dimension("grid", (5e-5, 3e-5, 2e-5)),
    "epochs": Dimension("grid", (2.0, 3.0, 4.0)),
}
GRIDS = {"paper": PAPER_GRID}


@dataclass(frozen=True)
class SweepOptions:
    """What `bertflow sweep` adds to the fine-tune settings (which are the fixed part of every trial)."""

    grid: str | None = None  # "paper": the BERT paper's 18 points
    space: str | None = None  # a YAML space file
    num_samples: int = 1
    scheduler: str = "none"  # none | asha
    grace_period: int = 1  # asha: epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0  # asha: the best 1/rf of the trials at a rung go on
    max_concurrent: int | None = run_only(None)  # default: GPUs / workers, 1 on one machine, else CPUs / trial CPUs
    seeds: str | None = "1,2,3"  # the best configuration's re-runs ("none": no re-run)
    search_seed: int = 0  # the generator of the sampled settings
    trial_retries: int = run_only(2)  # a trial whose process dies is started again (it resumes its last epoch)
    keep_trial_checkpoints: bool = run_only(False)  # trials keep checkpoint/ (default: metrics and predictions only)

    def __post_init__(self) -> None:
        if self.scheduler not in ("none", "asha"):
            raise InputError(f"sweep: --scheduler must be none or asha, got {self.scheduler!r}")
        if self.grid is not None and self.grid not in GRIDS:
            raise InputError(f"sweep: unknown --grid {self.grid!r}; known grids: {', '.join(GRIDS)}")
        if (self.grid is None) == (self.space is None):
            raise InputError("sweep: give the search space as exactly one of --grid paper or --space FILE")
        for name in ("num_samples", "grace_period"):
            if getattr(self, name) < 1:
                raise InputError(f"sweep: {name} must be at least 1, got {getattr(self, name)}")
        if not self.reduction_factor > 1:
            raise InputError(f"sweep: reduction_factor must be above 1, got {self.reduction_factor}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise InputError(f"sweep: max_concurrent must be at least 1, got {self.max_concurrent}")
        if self.trial_retries < 0:
            raise InputError(f"sweep: trial_retries must be >= 0, got {self.trial_retries}")
        try:
            rerun_seeds(self.seeds)
        except InputError as exc:
            raise InputError(f"sweep: --{exc}") from None

    @property
    def rerun_seeds(self) -> tuple[int, ...]:
        return rerun_seeds(self.seeds)


def rerun_seeds(text: str | None) -> tuple[int, ...]:
    """"1,2,3" -> (1, 2, 3); None, "" or "none" -> () (no re-run)."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    return parse_seeds(text, 1)


# ----------------------------------------------------------------------------- parsing and checking


def resolve_space(options: SweepOptions, base: FinetuneConfig) -> Space:
    """The named grid, or the space file parsed and checked against `base`."""
    if options.grid is not None:
        return GRIDS[options.grid]
    return load_space_file(options.space, base)


def load_space_file(path: str | Path, base: FinetuneConfig) -> Space:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"space file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_space(raw, str(path), base)


def parse_space(raw: Any, where: str, base: FinetuneConfig) -> Space:
    """{setting: {kind: values}} -> Space; every key, kind, bound and value checked (InputError naming it)."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{where}: expected a mapping of fine-tune settings to domains, e.g. "
                         "learning_rate: {loguniform: [1.0e-5, 1.0e-4]}; got " + repr(raw))
    hints = typing.get_type_hints(FinetuneConfig)
    sweepable = sorted(k for k in hints if k not in NOT_SWEEPABLE)
    space = {}
    for key, entry in raw.items():
        at = f"{where}: {key}"
        if key not in hints:
            raise InputError(f"{at}: unknown setting; sweepable settings: {', '.join(sweepable)}")
        if key in NOT_SWEEPABLE:
            raise InputError(f"{at}: cannot be swept (inputs, outputs, tracking, resources and logging are the same "
                             f"for every trial; set it as an option); sweepable settings: {', '.join(sweepable)}")
        if not isinstance(entry, dict) or len(entry) != 1:
            raise InputError(f"{at}: expected one domain, e.g. {{choice: [16, 32]}}; domains: {', '.join(DOMAINS)}; "
                             f"got {entry!r}")
        ((kind, values),) = entry.items()
        if kind not in DOMAINS:
            raise InputError(f"{at}: unknown domain {kind!r}; domains: {', '.join(DOMAINS)}")
        if not isinstance(values, list):
            raise InputError(f"{at}.{kind}: expected a list, got {values!r}")
        dimension = _dimension(kind, values, hints[key], f"{at}.{kind}")
        for value in dimension.values:
            _check_setting(base, key, value, f"{at}.{kind}")
        space[str(key)] = dimension
    return space


def _dimension(kind: str, values: list, annotation: Any, at: str) -> Dimension:
    if kind in ("choice", "grid"):
        if not values:
            raise InputError(f"{at}: empty {kind}: list at least one value")
        return Dimension(kind, tuple(check_value(v, annotation, f"{at}[{i}]") for i, v in enumerate(values)))
    if float not in (annotation, *typing.get_args(annotation)):
        shown = getattr(annotation, "__name__", str(annotation))
        raise InputError(f"{at}: {kind} needs a real-valued setting, this one is {shown}: use choice or grid")
    if len(values) != 2:
        raise InputError(f"{at}: expected [low, high], got {values!r}")
    low, high = (check_value(v, float, f"{at}[{i}]") for i, v in enumerate(values))
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise InputError(f"{at}: low {low} is above high {high}: expected [low, high] with low < high")
    if low == high:
        raise InputError(f"{at}: low equals high ({low}): a single value is an option, not a domain")
    if kind == "loguniform" and low <= 0:
        raise InputError(f"{at}: loguniform needs low > 0, got {low}")
    return Dimension(kind, (low, high))


def _check_setting(base: FinetuneConfig, key: str, value: Any, at: str) -> None:
    try:
        dataclasses.replace(base, **{key: value})
    except InputError as exc:
        raise InputError(f"{at}: {value!r}: {exc}") from None


# ----------------------------------------------------------------------------- trials


def expand(space: Space, num_samples: int, search_seed: int) -> list[dict[str, Any]]:
    """The sweep's trials in order: [{"name": "trial-000", "settings": {...}}, ...] (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(search_seed)
    axes = [k for k, d in space.items() if d.kind == "grid"]
    trials = []
    for _ in range(num_samples):
        for point in itertools.product(*(space[k].values for k in axes)):
            fixed = dict(zip(axes, point))
            settings = {k: fixed[k] if k in fixed else d.sample(rng) for k, d in space.items()}
            trials.append({"name": f"trial-{len(trials):03d}", "settings": settings})
    return trials


def space_dict(space: Space) -> dict[str, dict[str, list]]:
    return {k: d.to_dict() for k, d in space.items()}


def describe_settings(settings: dict[str, Any]) -> str:
    """"lr 3e-05, batch 16, epochs 3"."""
    def shown(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{SHORT_NAMES.get(k, k)} {shown(v)}" for k, v in settings.items())


def sweep_identity(base: FinetuneConfig, options: SweepOptions, space: Space) -> dict[str, Any]:
    """What defines a sweep's output: the fixed fine-tune settings, the space, the search and the re-run seeds."""
    fixed = {k: v for k, v in base.identity().items() if k != "seeds"} | {"seed": base.seed}
    search = {k: v for k, v in result_settings(options).items() if k not in ("grid", "space", "seeds")}
    if options.scheduler != "asha":
        search = {k: v for k, v in search.items() if k not in ("grace_period", "reduction_factor")}
    return {"finetune": fixed, "space": space_dict(space), "search": search, "seeds": list(options.rerun_seeds)}
