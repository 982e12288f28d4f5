"""Fault injection for resilience tests: fail one task's first attempt, on purpose.

`--set testing.inject_failure=<stage>:<partition>` makes that partition's first attempt raise
`InjectedFault` inside the worker; Spark retries the task (local[N,F] masters and clusters allow
retries) and the test checks that the output equals a run without the fault. Each injected fault
leaves a file in `testing.fault_log` so the test can see it really fired. Off (null) by default.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """Raised on purpose by `maybe_fail`; never caught by stage code."""


def fault_spec(cfg) -> dict | None:
    """The picklable part of the config a worker needs, or None when injection is off."""
    target = cfg.get("testing.inject_failure")
    if not target:
        return None
    stage, _, partition = str(target).partition(":")
    return {"stage": stage, "partition": int(partition or 0), "log": cfg.get("testing.fault_log")}


def maybe_fail(spec: dict | None, stage: str) -> None:
    """Call at the start of a worker's partition function."""
    if not spec or spec["stage"] != stage:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None or ctx.partitionId() != spec["partition"] or ctx.attemptNumber() > 0:
        return
    if spec.get("log"):
        os.makedirs(spec["log"], exist_ok=True)
        with open(os.path.join(spec["log"], f"{stage}-p{ctx.partitionId()}-a{ctx.attemptNumber()}"), "w") as fh:
            fh.write("injected\n")
    raise InjectedFault(f"injected failure in {stage} partition {ctx.partitionId()} (first attempt)")


def maybe_fail_step(spec: dict | None, stage: str, step: int) -> None:
    """For driver-side stages without tasks (takedown): raise before step number `partition`,
    as a kill at that point would leave things (nothing is cleaned up on the way out)."""
    if not spec or spec["stage"] != stage or step != spec["partition"]:
        return
    if spec.get("log"):
        os.makedirs(spec["log"], exist_ok=True)
        with open(os.path.join(spec["log"], f"{stage}-step{step}"), "w") as fh:
            fh.write("injected\n")
    raise InjectedFault(f"injected failure in {stage} before step {step}")
