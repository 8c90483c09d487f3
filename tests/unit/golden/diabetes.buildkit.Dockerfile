# Rendered by mlbuild <VERSION> for service diabetes of project diabetes.
# Layers run from least to most often changed: base, system setup, environment,
# serving runtime, the bytecode of what a start imports, settings, models (biggest
# first, one layer each), then the source: an edit of the entry script rebuilds the
# last layer only (the bytecode layer too when it changes what the script imports).
# For BuildKit. The installers' caches are cache mounts of the engine, so an edit of the
# lock downloads and unpacks only what changed (UV_LINK_MODE=copy: no file of a cache
# stays linked from a layer); their ids:
#   uv               mlbuild-uv-python:3.11-slim
# Without BuildKit, build the Dockerfile beside this one.

# uv itself, in a stage of its own: made once per base image, mounted where it is used.
FROM python:3.11-slim AS uv
RUN python -m pip install --no-cache-dir --disable-pip-version-check --target /opt/mlbuild-uv uv==0.13.9

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
# Installed in place, where the base image's Python looks (merged into what the base
# has there), from env/ mounted for this step alone.
RUN --mount=type=cache,id=mlbuild-uv-python:3.11-slim,target=/opt/mlbuild-build/uv-cache \
    --mount=type=bind,from=uv,source=/opt/mlbuild-uv,target=/opt/mlbuild-build/uv \
    --mount=type=bind,source=env/base.lock.txt,target=/opt/mlbuild-build/env/requirements.lock.txt \
    --mount=type=bind,source=env/runtime-requirements.txt,target=/opt/mlbuild-build/env/runtime-requirements.txt \
    --mount=type=bind,source=env/slim.py,target=/opt/mlbuild-build/env/slim.py \
    echo 'uv cache: mlbuild-uv-python:3.11-slim' \
 && export UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS=1 UV_LINK_MODE=copy UV_CACHE_DIR=/opt/mlbuild-build/uv-cache \
 && if [ -n "${PIP_INDEX_URL:-}" ]; then export UV_DEFAULT_INDEX="$PIP_INDEX_URL"; fi \
 && if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then export UV_INDEX="$PIP_EXTRA_INDEX_URL"; fi \
 && site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && scripts=$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))') \
 && install="/opt/mlbuild-build/uv/bin/uv pip install --python $(command -v python) --target /opt/mlbuild-root$site" \
 && $install --require-hashes --no-deps --requirement /opt/mlbuild-build/env/requirements.lock.txt \
 && $install --requirement /opt/mlbuild-build/env/runtime-requirements.txt \
 && rm -f "/opt/mlbuild-root$site/.lock" \
 && python /opt/mlbuild-build/env/slim.py --move-scripts /opt/mlbuild-root "$site" "$scripts" \
 && python /opt/mlbuild-build/env/slim.py /opt/mlbuild-root \
 && for dir in "$site" "$scripts"; do \
      [ -d "/opt/mlbuild-root$dir" ] || continue; \
      mkdir -p "$dir"; \
      for p in "/opt/mlbuild-root$dir"/*; do \
        [ -e "$p" ] || continue; \
        if [ -e "$dir/${p##*/}" ]; then cp -a "$p" "$dir/" && rm -rf "$p"; else mv "$p" "$dir/"; fi; \
      done; \
    done \
 && rm -rf /opt/mlbuild-root

# The serving runtime.
COPY runtime/ /opt/mlbuild/
# NOTE: the environment came without bytecode (in the demo, a third of its .pyc is for
# modules a service start never imports). This layer compiles what a start imports: the
# runtime, started once on loopback, and the modules in imports.txt (the app's imports
# and its models' pickled classes, see mlbuild/startup_imports.py). Without it each
# container start would compile numpy/scipy/sklearn again (+1.3 to +1.9 s measured).
# PYTHONNODEBUGRANGES (Python 3.11+): no column ranges in this bytecode (-7% of its
# size); tracebacks through these libraries still name every file and line.
COPY imports.txt /opt/mlbuild/imports.txt
# (First the empty mount points of the environment's step: BuildKit before 0.11 leaves them.)
RUN rm -rf /opt/mlbuild-build \
 && PYTHONNODEBUGRANGES=1 PYTHONPATH=/opt/mlbuild python -m mlbuild.runtime.warm /opt/mlbuild/imports.txt \
 || echo "warm: stopped early; what it compiled so far stays"

ENV PYTHONPATH=/opt/mlbuild \
    AML_APP_ROOT=/var/mlbuild/app \
    MLBUILD_ENTRY_SCRIPT=/var/mlbuild/app/score.py \
    MLBUILD_SCHEMA_INPUT=/var/mlbuild/samples/input.json \
    MLBUILD_SCHEMA_OUTPUT=/var/mlbuild/samples/output.json \
    MLBUILD_SERVICE_NAME=diabetes \
    MLBUILD_AUTH=key \
    MLBUILD_HOST=0.0.0.0 \
    MLBUILD_PORT=5001

LABEL org.opencontainers.image.title="diabetes-diabetes" \
      org.opencontainers.image.description="mlbuild service diabetes of project diabetes" \
      dev.mlbuild.project="diabetes" \
      dev.mlbuild.service="diabetes"

USER mlbuild
WORKDIR /var/mlbuild/app
EXPOSE 5001
# The port comes from MLBUILD_PORT, so `docker run -e MLBUILD_PORT=...` moves both.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz/ready' % os.environ['MLBUILD_PORT'], timeout=2)"]
CMD ["python", "-m", "mlbuild.runtime"]

# Models, then the settings that name their versions: a new model version re-runs
# these steps and the ones below only, not every instruction from the runtime on.
COPY models/ridge/1/ /var/mlbuild/models/ridge/1/
ENV MLBUILD_MODEL_DIR=/var/mlbuild/models/ridge/1 \
    AZUREML_MODEL_DIR=/var/mlbuild/models/ridge/1
LABEL dev.mlbuild.models="ridge:1"

COPY samples/ /var/mlbuild/samples/
# Source and entry script.
COPY app/ /var/mlbuild/app/
