# Rendered by mlbuild <VERSION> for service classify of project iris.
# Layers run from least to most often changed: base, system setup, environment,
# serving runtime, settings, models (biggest first, one layer each), then the source:
# an edit of the entry script rebuilds the last layer only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8

# A non-root user to run the service.
RUN (getent group mlbuild || groupadd --system --gid 10001 mlbuild) \
 && (id -u mlbuild || useradd --system --uid 10001 --gid mlbuild --home-dir /var/mlbuild --no-create-home mlbuild) \
 && mkdir -p /var/mlbuild \
 && chown mlbuild:mlbuild /var/mlbuild

# The environment.
# NOTE: the packages' own test suites are dropped in the RUN that installs them
# (numpy/scipy/scikit-learn: 60 MB of the demo's 270 MB, with their .pyc): no
# service imports them, and removed in a later step they would stay in this layer. The
# .pyc files pip compiles stay: without them each container start compiles
# numpy/scipy/sklearn again (+1.3 to +1.9 s a start measured, two starts a redeploy).
COPY env/requirements.lock.txt /opt/mlbuild-env/requirements.lock.txt
RUN python -m pip install --require-hashes --no-deps --requirement /opt/mlbuild-env/requirements.lock.txt \
 && for d in $(python -c 'import os, sysconfig; print(*{p for p in (sysconfig.get_path(k) for k in ("purelib", "platlib")) if os.path.isdir(p)})'); \
    do find "$d" -mindepth 2 -type d -name tests -prune -exec rm -rf {} +; done

# The serving runtime.
COPY runtime/mlbuild/runtime/requirements.txt /opt/mlbuild-env/runtime-requirements.txt
RUN python -m pip install --requirement /opt/mlbuild-env/runtime-requirements.txt
COPY runtime/ /opt/mlbuild/

ENV PYTHONPATH=/opt/mlbuild \
    AML_APP_ROOT=/var/mlbuild/app \
    MLBUILD_SERVICE_NAME=classify \
    MLBUILD_AUTH=none \
    MLBUILD_HOST=0.0.0.0 \
    MLBUILD_PORT=5001

LABEL org.opencontainers.image.title="iris-classify" \
      org.opencontainers.image.description="mlbuild service classify of project iris" \
      dev.mlbuild.project="iris" \
      dev.mlbuild.service="classify"

USER mlbuild
WORKDIR /var/mlbuild/app
EXPOSE 5001
# The port comes from MLBUILD_PORT, so `docker run -e MLBUILD_PORT=...` moves both.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz/ready' % os.environ['MLBUILD_PORT'], timeout=2)"]
CMD ["python", "-m", "mlbuild.runtime"]

# Models, then the settings that name their versions: a new model version re-runs
# these steps and the ones below only, not every instruction from the runtime on.
COPY models/clf/1/ /var/mlbuild/models/clf/1/
ENV MLBUILD_MODEL_DIR=/var/mlbuild/models/clf/1 \
    MLBUILD_NO_CODE_MODEL=/var/mlbuild/models/clf/1/clf.pkl \
    MLBUILD_NO_CODE_FRAMEWORK=scikit-learn \
    AZUREML_MODEL_DIR=/var/mlbuild/models/clf/1
LABEL dev.mlbuild.models="clf:1"

# Source and entry script.
