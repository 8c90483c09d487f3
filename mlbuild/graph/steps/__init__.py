"""Step kinds, one module each. ``STEP_KINDS`` maps a kind name to its class.

Kinds that later parts of mlbuild bring (``lock``, ``image``, ``push``, ``deploy``,
``health``) plug in here; the planner already leaves their place in the graph.
"""

from __future__ import annotations

from mlbuild.graph.steps.container import ContainerStep
from mlbuild.graph.steps.context import ContextStep
from mlbuild.graph.steps.image import ImageStep, ImageTarStep, PushStep
from mlbuild.graph.steps.lock import LockStep
from mlbuild.graph.steps.model import ModelStep
from mlbuild.graph.steps.package import PackageStep
from mlbuild.graph.steps.process import ProcessStep
from mlbuild.graph.steps.venv import VenvStep
from mlbuild.graph.steps.wheels import WheelsStep

STEP_KINDS = {cls.kind: cls for cls in (ModelStep, ContextStep, PackageStep, VenvStep,
                                        ProcessStep, ImageStep, PushStep, ContainerStep,
                                        ImageTarStep, LockStep, WheelsStep)}
