"""The default environments of no-code services.

A service without an entry script whose one model is a scikit-learn or ONNX model is
served without code, as Azure ML v1's ``Model.deploy(ws, name, [model])`` served one
with no script and no environment. Such a service may leave out ``environment``: the
loader (:mod:`mlbuild.manifest.semantic`) then adds a default environment for its
model's framework to the Project, an inline pip environment like a declared one, so
every step handles it unchanged: locked into ``locks/<name>.lock.txt`` (committed),
installed from the lock by the venv step and the image, fetched by the wheels step.

One environment per framework and version, named after them, so every no-code service
that needs the same one shares it: one lock step, one venv, one image layer::

    _nocode-scikit-learn-1.5    scikit-learn==1.5.*, joblib
    _nocode-onnx                onnxruntime, numpy

A declared environment's name starts with a letter or a digit (the schema's
``itemName``), so the leading ``_`` never collides with one, and a service cannot name
a default environment itself.

scikit-learn: a pickle loads reliably only in the release series that wrote it, so
``framework_version`` pins the series ("1.5": any 1.5.x; the lock picks the newest
patch release and keeps it). Without one, :data:`DEFAULT_SKLEARN_VERSION`, the version
the examples and the docs declare: a fixed version, not "the newest", so the
environment a manifest means does not move with PyPI (only the lock would remember what
"newest" was), and a later change of the default shows as a new environment name
rather than a silent upgrade.

ONNX: ``framework_version`` is the ONNX version the model was exported with, not an
onnxruntime version (their numbers differ: onnxruntime 1.18 implements ONNX 1.16), and
onnxruntime runs every ONNX version up to its own. So it pins nothing: one environment
serves every ONNX model, locked to the newest onnxruntime at its first lock; a model
exported later by a newer ONNX needs ``mlbuild lock _nocode-onnx --upgrade``. numpy is
named because the runtime imports it itself (onnxruntime brings it too).

Python: the default of pip environments (3.11, the default base image's); the base
image: the project's ``base_image`` if it names one.
"""

from __future__ import annotations

from mlbuild.manifest.model import Environment

PREFIX = "_nocode-"
DEFAULT_SKLEARN_VERSION = "1.5"


def environment_name(framework: str, framework_version: str | None) -> str:
    """The name of the default environment of a no-code model."""
    if framework == "scikit-learn":
        return f"{PREFIX}scikit-learn-{framework_version or DEFAULT_SKLEARN_VERSION}"
    return f"{PREFIX}{framework}"


def default_environment(framework: str, framework_version: str | None,
                        base_image: str | None = None) -> Environment:
    """The default environment of a no-code model (see the module docstring).

    Args:
        framework: ``scikit-learn`` or ``onnx`` (one of NO_CODE_FRAMEWORKS).
        framework_version: the model's ``framework_version`` as written (a version
            such as "1.5", checked by the caller), or None.
        base_image: the project's ``base_image``, if any.
    """
    if framework == "scikit-learn":
        version = framework_version or DEFAULT_SKLEARN_VERSION
        packages = (f"scikit-learn=={version}.*", "joblib")
    elif framework == "onnx":
        packages = ("onnxruntime", "numpy")
    else:  # pragma: no cover - the caller checks the framework
        raise ValueError(f"no default environment for framework {framework!r}")
    return Environment(name=environment_name(framework, framework_version),
                       packages=packages, base_image=base_image, default_for=framework)
