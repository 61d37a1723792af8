"""``walstore simulate``: run seeds of the deterministic simulator from the command line."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from walstore.planted_bugs import BUGS
from walstore.sim.kinds import FRAME_KINDS, KINDS

if TYPE_CHECKING:
    from walstore.sim.run import SeedResult

ALL_FAULTS = KINDS + FRAME_KINDS

HELP = f"""Run the deterministic whole-cluster simulator (docs/simulation.md).

Each seed builds a cluster of real nodes on simulated disks, network and etcd, runs client
load while faults are injected, heals everything, and checks the history and the core
invariants. A failing seed prints the tail of its trace; `--seed S --trace` replays it.

\b
Fault kinds (--faults, comma-separated; default all):
  {", ".join(KINDS)}
  frame faults: {", ".join(FRAME_KINDS)}

\b
Exit codes: 0 no violation, 1 a seed failed (or, with --plant, none did), 2 usage.
"""


def _split(value: str | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not value:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


@click.command(help=HELP)
@click.option("--seeds", "count", type=click.IntRange(min=1), default=100, show_default=True, help="Seeds to run.")
@click.option("--first-seed", type=int, default=1, show_default=True, help="The first seed of the range.")
@click.option("--seed", type=int, default=None, help="Run this one seed only (a replay).")
@click.option("--budget", "budget_s", type=click.FloatRange(min=1), default=None, help="Stop after this many seconds.")
@click.option("--nodes", type=click.Choice(["3", "5"]), default="3", show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1, max=600),
    default=20.0,
    show_default=True,
    help="Virtual seconds of load and faults per seed.",
)
@click.option("--faults", default=None, help="Fault kinds to inject (default: all).")
@click.option(
    "--plant",
    default=None,
    help=f"Plant known bugs (test only): {', '.join(BUGS)}. One bug without --faults runs under its profile.",
)
@click.option("--trace", "show_trace", is_flag=True, help="Print the whole trace of every seed run.")
@click.option("--keep-going", is_flag=True, help="Do not stop at the first failing seed.")
def simulate(
    count: int,
    first_seed: int,
    seed: int | None,
    budget_s: float | None,
    nodes: str,
    seconds: float,
    faults: str | None,
    plant: str | None,
    show_trace: bool,
    keep_going: bool,
) -> None:
    # str hashes are salted per process; set iteration in the code under test would then
    # differ between a run and its replay in another process. Fix the salt and start again.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "walstore", *sys.argv[1:]])
    from walstore.sim.many import run_seeds
    from walstore.sim.planted import profile
    from walstore.sim.run import SimOptions

    bugs = _split(plant, BUGS, "planted bug(s)")
    if len(bugs) == 1 and not faults:
        # One bug and no --faults: the faults that stage it (the test's CI profile), so
        # that "not found" means the simulator missed it, not that it was never staged.
        options = profile(bugs[0], nodes=int(nodes), seconds=seconds)
        click.echo(f"planting {bugs[0]} under its profile: faults {', '.join(options.faults)}")
    else:
        options = SimOptions(
            nodes=int(nodes),
            seconds=seconds,
            faults=_split(faults, ALL_FAULTS, "fault kind(s)") or ALL_FAULTS,
            plant=bugs,
        )
    seeds = [seed] if seed is not None else range(first_seed, first_seed + count)

    done = 0

    def show(result: SeedResult) -> None:
        nonlocal done
        done += 1
        if show_trace:
            click.echo("\n".join(result.trace.lines))
        if result.ok and seed is None and not show_trace:
            if done % 100 == 0:
                click.echo(f"... {done} seeds, the last {result.seed}")
            return
        state = "ok" if result.ok else "FAIL"
        click.echo(
            f"seed {result.seed}: {state}  acked {result.acked}, events {result.events}, "
            f"{result.virtual_s:.0f}s virtual in {result.wall_s:.1f}s, trace {result.digest}"
        )
        if not result.ok:
            for violation in result.violations[:10]:
                click.echo(f"  {violation}")
            if not show_trace:
                click.echo("  trace (last lines):")
                click.echo("\n".join("    " + line for line in result.trace.lines[-60:]))
            click.echo(
                f"  replay: walstore simulate --seed {result.seed} --seconds {seconds:g}"
                + (f" --nodes {nodes}" if nodes != "3" else "")
                + (f" --faults {faults}" if faults else "")
                + (f" --plant {plant}" if plant else "")
                + " --trace"
            )

    summary = run_seeds(seeds, options, budget_s=budget_s, stop_at_first_failure=not keep_going, on_result=show)
    click.echo(summary.report())
    if options.plant:
        sys.exit(0 if summary.failed else 1)  # the point of a planted bug is to be found
    sys.exit(1 if summary.failed else 0)
