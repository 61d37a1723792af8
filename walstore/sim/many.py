"""Many seeds: run them one after another (within a time budget, if given) and sum up."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from walstore.sim.run import SeedResult, SimOptions, simulate


@dataclass
class Summary:
    seeds_run: int = 0
    wall_s: float = 0.0
    virtual_s: float = 0.0
    acked: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)  # by kind
    failed: list[SeedResult] = field(default_factory=list)

    @property
    def seeds_per_s(self) -> float:
        return self.seeds_run / self.wall_s if self.wall_s else 0.0

    def report(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        found = ", ".join(f"{k} {v}" for k, v in sorted(self.violations.items())) or "none"
        return "\n".join(
            [
                f"seeds: {self.seeds_run} in {self.wall_s:.1f}s ({self.seeds_per_s:.2f} seeds/s; "
                f"{self.virtual_s:.0f} virtual seconds; {self.acked} writes acknowledged)",
                f"faults injected: {faults}",
                f"violations: {found}",
                f"failing seeds: {', '.join(str(r.seed) for r in self.failed) or 'none'}",
            ]
        )


def violation_kind(violation: str) -> str:
    return violation.split(":", 1)[0]


def run_seeds(
    seeds: Iterable[int],
    options: SimOptions,
    *,
    budget_s: float | None = None,
    stop_at_first_failure: bool = False,
    on_result: Callable[[SeedResult], None] | None = None,
) -> Summary:
    """Run ``seeds`` in order; stop when the wall-clock budget is spent (the seed running
    then still finishes) or, if asked, at the first failing seed."""
    summary = Summary()
    started = time.perf_counter()
    for seed in seeds:
        if budget_s is not None and time.perf_counter() - started >= budget_s:
            break
        result = simulate(seed, options)
        summary.seeds_run += 1
        summary.virtual_s += result.virtual_s
        summary.acked += result.acked
        summary.faults.update(result.faults)
        for kind in {violation_kind(v) for v in result.violations}:
            summary.violations[kind] += 1
        if on_result is not None:
            on_result(result)
        if not result.ok:
            summary.failed.append(result)
            if stop_at_first_failure:
                break
    summary.wall_s = time.perf_counter() - started
    return summary
