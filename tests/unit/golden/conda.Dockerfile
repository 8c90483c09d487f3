# Rendered by mlbuild <VERSION> for service scorer of project condaproj.
# Layers run from least to most often changed: base, system setup, environment,
# serving runtime, the bytecode of what a start imports, settings, models (biggest
# first, one layer each), then the source: an edit of the entry script rebuilds the
# last layer only (the bytecode layer too when it changes what the script imports).
# The conda environment is made in a builder stage: exactly the locked packages,
# installed by mlbuild's installer on py-rattler (no micromamba: see
# mlbuild/backends/conda.py), then the lock's pip section and the serving runtime's
# requirements with uv, made smaller (mlbuild/slim.py). Only /opt/conda reaches
# the image.
# The builder is always python:3.11-slim (a Python with pip for the installer, whose
# offline wheels are for it); the environment brings its own Python.
FROM python:3.11-slim AS conda-env
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8
RUN python -m pip install 'py-rattler>=0.28,<0.29' 'pyyaml>=6' uv==0.13.9
COPY env/installer/ /opt/mlbuild-installer/
COPY env/slim.py /opt/mlbuild-env/slim.py
COPY env/conda-lock.yml /opt/mlbuild-env/conda-lock.yml
RUN PYTHONPATH=/opt/mlbuild-installer python -m mlbuild.backends.conda install /opt/mlbuild-env/conda-lock.yml /opt/conda --platform linux-64 --cache-dir /tmp/conda-pkgs-cache
COPY env/runtime-requirements.txt /opt/mlbuild-env/runtime-requirements.txt
RUN export UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS=1 UV_LINK_MODE=copy UV_NO_CACHE=1 \
 && if [ -n "${PIP_INDEX_URL:-}" ]; then export UV_DEFAULT_INDEX="$PIP_INDEX_URL"; fi \
 && if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then export UV_INDEX="$PIP_EXTRA_INDEX_URL"; fi \
 && PYTHONPATH=/opt/mlbuild-installer python -m mlbuild.backends.conda pip-requirements /opt/mlbuild-env/conda-lock.yml --platform linux-64 > /opt/mlbuild-env/pip.lock.txt \
 && python -m uv pip install --python /opt/conda/bin/python --require-hashes --no-deps --requirement /opt/mlbuild-env/pip.lock.txt \
 && python -m uv pip install --python /opt/conda/bin/python --requirement /opt/mlbuild-env/runtime-requirements.txt \
 && python /opt/mlbuild-env/slim.py /opt/conda

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
COPY --from=conda-env /opt/conda /opt/conda
# The environment's python and pip come first, for the HEALTHCHECK and CMD too.
ENV PATH=/opt/conda/bin:$PATH

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
    MLBUILD_CORS_ORIGINS="https://www.example.com,http://localhost:3000" \
    MLBUILD_SERVICE_NAME=scorer \
    MLBUILD_AUTH=none \
    MLBUILD_HOST=0.0.0.0 \
    MLBUILD_PORT=5001

LABEL org.opencontainers.image.title="condaproj-scorer" \
      org.opencontainers.image.description="mlbuild service scorer of project condaproj" \
      dev.mlbuild.project="condaproj" \
      dev.mlbuild.service="scorer"

USER mlbuild
WORKDIR /var/mlbuild/app
EXPOSE 5001
# The port comes from MLBUILD_PORT, so `docker run -e MLBUILD_PORT=...` moves both.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz/ready' % os.environ['MLBUILD_PORT'], timeout=2)"]
CMD ["python", "-m", "mlbuild.runtime"]

# Models, then the settings that name their versions: a new model version re-runs
# these steps and the ones below only, not every instruction from the runtime on.
COPY models/net/1/ /var/mlbuild/models/net/1/
ENV MLBUILD_MODEL_DIR=/var/mlbuild/models/net/1 \
    AZUREML_MODEL_DIR=/var/mlbuild/models/net/1
LABEL dev.mlbuild.models="net:1"

# Source and entry script.
COPY app/ /var/mlbuild/app/
