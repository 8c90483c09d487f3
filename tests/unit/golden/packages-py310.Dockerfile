# Rendered by mlbuild <VERSION> for service api of project pkgs.
# Layers run from least to most often changed: base, system setup, environment,
# serving runtime, the bytecode of what a start imports, settings, models (biggest
# first, one layer each), then the source: an edit of the entry script rebuilds the
# last layer only (the bytecode layer too when it changes what the script imports).
# The packages are installed by uv in a builder stage, under /opt/mlbuild-root as if it
# were /, and made smaller there (mlbuild/slim.py: debug sections stripped, test suites,
# bytecode caches, C/Cython sources and stubs removed, duplicates linked). That tree is
# copied onto the image.
FROM python:3.10-slim AS env
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
RUN python -m pip install --target /opt/mlbuild-uv uv==0.13.9
COPY env/ /opt/mlbuild-env/
RUN export UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS=1 UV_LINK_MODE=copy UV_NO_CACHE=1 \
 && if [ -n "${PIP_INDEX_URL:-}" ]; then export UV_DEFAULT_INDEX="$PIP_INDEX_URL"; fi \
 && if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then export UV_INDEX="$PIP_EXTRA_INDEX_URL"; fi \
 && site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && scripts=$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))') \
 && install="/opt/mlbuild-uv/bin/uv pip install --python $(command -v python) --target /opt/mlbuild-root$site" \
 && $install --require-hashes --no-deps --requirement /opt/mlbuild-env/requirements.lock.txt \
 && $install --requirement /opt/mlbuild-env/runtime-requirements.txt \
 && rm -f "/opt/mlbuild-root$site/.lock" \
 && python /opt/mlbuild-env/slim.py --move-scripts /opt/mlbuild-root "$site" "$scripts" \
 && python /opt/mlbuild-env/slim.py /opt/mlbuild-root

FROM python:3.10-slim

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
COPY --from=env /opt/mlbuild-root/ /

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
RUN PYTHONNODEBUGRANGES=1 PYTHONPATH=/opt/mlbuild python -m mlbuild.runtime.warm /opt/mlbuild/imports.txt \
 || echo "warm: stopped early; what it compiled so far stays"

ENV PYTHONPATH=/opt/mlbuild \
    AML_APP_ROOT=/var/mlbuild/app \
    MLBUILD_ENTRY_SCRIPT=/var/mlbuild/app/score.py \
    MLBUILD_SERVICE_NAME=api \
    MLBUILD_AUTH=key \
    MLBUILD_HOST=0.0.0.0 \
    MLBUILD_PORT=5001

LABEL org.opencontainers.image.title="pkgs-api" \
      org.opencontainers.image.description="mlbuild service api of project pkgs" \
      dev.mlbuild.project="pkgs" \
      dev.mlbuild.service="api"

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

# Source and entry script.
COPY app/ /var/mlbuild/app/
