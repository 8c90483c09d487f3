"""A fake Kubernetes API server and a controller stand-in, for mlbuild's kubernetes
target: the same contract tests (test_kubefake.py) run against it and, with
MLBUILD_TEST_KUBECONFIG set, against a real cluster. See README.md for what differs."""

from .controller import OUTCOMES, Controller, pod_template_hash
from .server import KINDS, ApiStatus, KubeFake, RecordedRequest

__all__ = ["ApiStatus", "Controller", "KINDS", "KubeFake", "OUTCOMES", "RecordedRequest", "pod_template_hash"]
