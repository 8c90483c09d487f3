"""What a step is, and what it is given to work with.

A step is one node of the graph: ``model:ridge``, ``context:diabetes``,
``package:bundle/diabetes``. Its kind (one module each under ``graph/steps/``) knows
how to describe its inputs, check its outputs and run.

    inputs ──▶ detail (canonical JSON) ──sha256──▶ fingerprint
    run() ──▶ outputs (JSON) ──identity()──sha256──▶ output key ──▶ downstream detail

Downstream steps depend on an upstream step's *output key*, not its fingerprint:
when an upstream step re-runs and produces the same output (a model's tags changed,
a template edit that renders the same text), the steps below it stay up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from mlbuild.manifest.model import Project, Target
    from mlbuild.state.db import StateDB
    from mlbuild.state.digest import DigestCache
    from mlbuild.state.registry import Registry


@dataclass
class StepSpec:
    """A planned step: what the planner emits and the plan cache stores."""

    id: str
    kind: str
    params: dict
    deps: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "params": self.params, "deps": self.deps}

    @classmethod
    def from_json(cls, d: dict) -> "StepSpec":
        return cls(d["id"], d["kind"], d["params"], list(d["deps"]))


@dataclass
class BuildContext:
    """Everything a step may use. Built once per command by ``api``."""

    project: "Project"
    target: "Target"
    db: "StateDB"
    digests: "DigestCache"
    registry: "Registry"
    options: dict = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None

    @property
    def state_dir(self):
        return self.db.state_dir


class Step:
    """Base class of the step kinds.

    Subclasses set ``kind`` and ``version`` (bump it when the implementation changes
    what the step produces: it enters every fingerprint of that kind) and list the
    templates they render.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1
    templates: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: StepSpec):
        self.spec = spec
        self.id = spec.id
        self.params = spec.params

    # -- what the fingerprint is made of -------------------------------------------

    def config(self, ctx: BuildContext) -> dict[str, Any]:
        """The manifest settings that configure this step, as ``{field path: subtree}``."""
        return {}

    def inputs(self, ctx: BuildContext) -> dict[str, str]:
        """Input files as ``{display path: digest}`` (manifest-relative where possible)."""
        return {}

    def extra(self, ctx: BuildContext) -> dict[str, Any]:
        """Other facts the result depends on (e.g. a pinned model's registered digest)."""
        return {}

    # -- outputs --------------------------------------------------------------------

    def check_outputs(self, ctx: BuildContext, outputs: dict) -> str | None:
        """Verify the recorded outputs still exist and are intact.

        Returns:
            None when they are, else the reason (``output dist/package missing``).
        """
        return None

    def run(self, ctx: BuildContext, upstream: dict[str, dict], fingerprint: str) -> dict:
        """Do the work. ``upstream`` maps each dependency's id to its outputs.

        Returns:
            JSON-able outputs. Raises MlbuildError (StepFailed for a failed action).
        """
        raise NotImplementedError

    def identity(self, outputs: dict) -> Any:
        """The part of the outputs downstream steps depend on (default: all of it)."""
        return outputs

    def summary(self, outputs: dict) -> str:
        """One line saying what the step produced, for the run report."""
        return ""
