"""Running a plan: for each step, in topological order::

    fingerprint(detail) == recorded and outputs verified?  ─yes─▶ up to date
                                                           ─no──▶ run, then record

A step is recorded only after it succeeded, in its own transaction, so an
interrupted or killed run leaves every finished step recorded and the next run
redoes exactly the rest. ``dry_run`` (``mlbuild plan``) decides without running:
a step below one that would run is reported as "upstream X will run".
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from mlbuild.errors import MlbuildError, StepFailed
from mlbuild.graph.step import BuildContext, Step, StepSpec
from mlbuild.graph.steps import STEP_KINDS
from mlbuild.render import template_digest
from mlbuild.state.db import StepRecord
from mlbuild.state.digest import hash_json

UP_TO_DATE = "up-to-date"
RAN = "ran"
WOULD_RUN = "would-run"
FAILED = "failed"
NOT_RUN = "not-run"
UNKNOWN = "?"  # an upstream output not known yet (dry run)
_KILL_AT = os.environ.get("MLBUILD_DEBUG_KILL_AFTER")


@dataclass
class Outcome:
    """What happened to (or would happen to) one step, and why."""

    id: str
    kind: str
    status: str
    reasons: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    duration: float = 0.0
    summary: str = ""
    error: str | None = None
    outputs: dict | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "reasons": self.reasons,
                "fingerprint": self.fingerprint, "duration": round(self.duration, 4),
                "summary": self.summary, "error": self.error}


def make_step(spec: StepSpec) -> Step:
    return STEP_KINDS[spec.kind](spec)


def compute_detail(step: Step, ctx: BuildContext, upstream_keys: dict[str, str]) -> dict:
    """The canonical description of everything the step's result depends on."""
    return {
        "kind": step.kind,
        "version": step.version,
        "config": step.config(ctx),
        "inputs": step.inputs(ctx),
        "extra": step.extra(ctx),
        "templates": {t: template_digest(t) for t in step.templates},
        "upstream": upstream_keys,
    }


def _changed_paths(old, new, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changed_paths(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix]


def reasons_for(old: dict | None, new: dict) -> list[str]:
    """Why a step must run, comparing the recorded detail with the current one."""
    if old is None:
        return ["new"]
    reasons = []
    if old.get("kind") != new["kind"] or old.get("version") != new["version"]:
        reasons.append(f"mlbuild's {new['kind']} step changed (v{old.get('version')} -> v{new['version']})")
    for path in _changed_paths(old.get("config", {}), new["config"], ""):
        reasons.append(f"setting {path} changed")
    oi, ni = old.get("inputs", {}), new["inputs"]
    for p in sorted(set(oi) | set(ni)):
        if p not in oi:
            reasons.append(f"input {p} added")
        elif p not in ni:
            reasons.append(f"input {p} removed")
        elif oi[p] != ni[p]:
            reasons.append(f"input {p} changed")
    for path in _changed_paths(old.get("extra", {}), new["extra"], ""):
        reasons.append(f"{path} changed")
    ot, nt = old.get("templates", {}), new["templates"]
    for t in sorted(set(ot) | set(nt)):
        if ot.get(t) != nt.get(t):
            reasons.append(f"template {t} changed")
    ou, nu = old.get("upstream", {}), new["upstream"]
    for u in sorted(set(ou) | set(nu)):
        if nu.get(u) == UNKNOWN:
            reasons.append(f"upstream {u} will run")
        elif u not in nu:
            reasons.append(f"upstream {u} removed")
        elif ou.get(u) != nu.get(u):
            reasons.append(f"upstream {u} re-ran" if u in ou else f"upstream {u} added")
    return reasons or ["fingerprint changed"]


# Step kinds that may run side by side with -j N: they touch only their own outputs
# (and the engine), never the state database, while they run.
PARALLEL_KINDS = frozenset({"image"})


def _timed(step: Step, ctx: BuildContext, upstream: dict, fp: str):
    started = time.monotonic()
    try:
        return step.run(ctx, upstream, fp), None, time.monotonic() - started
    except Exception as e:  # re-raised in order by the main loop
        return None, e, time.monotonic() - started


def execute(ctx: BuildContext, specs: list[StepSpec], *, dry_run: bool = False,
            force: bool = False, on_event: Callable[[str, Outcome], None] | None = None,
            jobs: int = 1) -> list[Outcome]:
    """Run (or, with ``dry_run``, judge) the steps. Stops at the first failure.

    Args:
        ctx: what the steps work with.
        specs: the planned steps, topologically sorted.
        dry_run: decide and explain, change nothing.
        force: run every step even when up to date.
        on_event: called with ("start", outcome) before a step runs and ("end", outcome)
            after each step is decided or finished.
        jobs: with more than 1, the steps of PARALLEL_KINDS whose inputs are ready run
            in up to ``jobs`` threads (independent image builds); their results are
            recorded, and their errors raised, in the plan's order.

    Returns:
        One Outcome per step, in order. A failed step has status FAILED and the steps
        after it NOT_RUN; the exception is re-raised after ``on_event`` saw them all,
        carrying the outcomes as ``.outcomes``. (A dry run may still write new entries
        of the file-digest cache: they are facts about files, not decisions.)
    """
    emit = on_event or (lambda ev, o: None)
    keys: dict[str, str] = {}
    outputs: dict[str, dict] = {}
    outcomes: list[Outcome] = []
    records = ctx.db.all_steps()
    ran_ahead: dict[str, tuple] = {}  # step id -> (outputs, error, duration)

    def run_ahead(i: int, first: tuple) -> None:
        """Run ``first`` and the later parallel steps whose inputs are ready, together."""
        from concurrent.futures import ThreadPoolExecutor

        batch = [first]
        for sj in specs[i + 1:]:
            if sj.kind not in PARALLEL_KINDS or any(keys.get(d, UNKNOWN) == UNKNOWN
                                                    for d in sj.deps):
                continue
            step_j = make_step(sj)
            fp_j = hash_json(compute_detail(step_j, ctx, {d: keys[d] for d in sj.deps}))
            rec_j = records.get(sj.id)
            if not force and rec_j is not None and rec_j.fingerprint == fp_j and \
                    step_j.check_outputs(ctx, rec_j.outputs) is None:
                continue  # up to date: decided again, cheaply, in its turn
            batch.append((sj, step_j, fp_j))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {sp.id: pool.submit(_timed, st, ctx, {d: outputs[d] for d in sp.deps}, f)
                       for sp, st, f in batch}
        for sid, fut in futures.items():
            ran_ahead[sid] = fut.result()

    def fail(i: int, outcome: Outcome, err: MlbuildError, message: str, started: float) -> None:
        """Record the failed step and the ones after it, on the error too."""
        outcome.status = FAILED
        outcome.error = message
        outcome.duration = time.monotonic() - started
        outcomes.append(outcome)
        emit("end", outcome)
        for rest in specs[i + 1:]:
            skipped = Outcome(rest.id, rest.kind, NOT_RUN)
            outcomes.append(skipped)
            emit("end", skipped)
        err.outcomes = outcomes

    try:
        for i, spec in enumerate(specs):
            step = make_step(spec)
            outcome = Outcome(spec.id, spec.kind, UP_TO_DATE)
            started = time.monotonic()
            try:
                upstream_keys = {d: keys[d] for d in spec.deps}
                detail = compute_detail(step, ctx, upstream_keys)
            except MlbuildError as e:
                fail(i, outcome, e, e.message, started)
                raise
            fp = outcome.fingerprint = hash_json(detail)
            rec = records.get(spec.id)
            if rec is not None and rec.fingerprint == fp and not force:
                missing = step.check_outputs(ctx, rec.outputs)
                if missing is None:
                    keys[spec.id] = rec.output_key
                    outputs[spec.id] = rec.outputs
                    outcome.outputs = rec.outputs
                    outcomes.append(outcome)
                    emit("end", outcome)
                    continue
                outcome.reasons = [missing]
            elif force and rec is not None and rec.fingerprint == fp:
                outcome.reasons = ["forced"]
            else:
                outcome.reasons = reasons_for(rec.detail if rec else None, detail)

            if dry_run:
                preview = getattr(step, "preview", None)
                if preview is not None:
                    outcome.reasons.append(
                        preview(ctx, None if UNKNOWN in upstream_keys.values() else fp))
                outcome.status = WOULD_RUN
                keys[spec.id] = UNKNOWN
                outcomes.append(outcome)
                emit("end", outcome)
                continue
            if UNKNOWN in upstream_keys.values():  # cannot happen outside dry runs
                raise AssertionError(spec.id)

            emit("start", outcome)
            started = time.monotonic()
            if jobs > 1 and spec.kind in PARALLEL_KINDS and spec.id not in ran_ahead:
                run_ahead(i, (spec, step, fp))
            try:
                if spec.id in ran_ahead:
                    out, error, took = ran_ahead.pop(spec.id)
                    started = time.monotonic() - took
                    if error is not None:
                        raise error
                else:
                    out = step.run(ctx, {d: outputs[d] for d in spec.deps}, fp)
            except MlbuildError as e:
                fail(i, outcome, e, e.message, started)
                raise
            except OSError as e:
                # Two names (a copy, a rename): both, the second being the one written.
                where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
                msg = f"{e.strerror or e}: {where}" if e.filename else str(e)
                err = StepFailed(spec.id, msg)
                fail(i, outcome, err, msg, started)
                raise err from e
            if _KILL_AT and spec.id == _KILL_AT:
                # Fault injection for tests: die the hardest way at the worst moment,
                # after the step's outputs are written and before they are recorded.
                os.kill(os.getpid(), signal.SIGKILL)
            outcome.duration = time.monotonic() - started
            outcome.status = RAN
            outcome.outputs = out
            outcome.summary = step.summary(out)
            key = hash_json(step.identity(out))
            ctx.digests.flush()
            ctx.db.record_step(StepRecord(spec.id, spec.kind, fp, key, detail, out,
                                          time.time(), outcome.duration))
            if rec is not None and rec.output_key == key and outcome.reasons != ["new"]:
                outcome.summary += " (same output as before)"
            keys[spec.id] = key
            outputs[spec.id] = out
            outcomes.append(outcome)
            emit("end", outcome)
    finally:
        ctx.digests.flush()
        finish = getattr(ctx.options.get("_docker"), "finish", None)
        if finish is not None:  # the clean-ups its builds left running (docker.py)
            finish()
    return outcomes
