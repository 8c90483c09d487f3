# Rendered by mlbuild <VERSION> for service iris of project onnx-nocode.
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
COPY env/requirements.lock.txt /opt/mlbuild-env/requirements.lock.txt
RUN python -m pip install --require-hashes --no-deps --requirement /opt/mlbuild-env/requirements.lock.txt

# The serving runtime.
COPY runtime/mlbuild/runtime/requirements.txt /opt/mlbuild-env/runtime-requirements.txt
RUN python -m pip install --requirement /opt/mlbuild-env/runtime-requirements.txt
COPY runtime/ /opt/mlbuild/

ENV PYTHONPATH=/opt/mlbuild \
    AML_APP_ROOT=/var/mlbuild/app \
    MLBUILD_MODEL_DIR=/var/mlbuild/models/iris/1 \
    AZUREML_MODEL_DIR=/var/mlbuild/models/iris/1 \
    MLBUILD_NO_CODE_MODEL=/var/mlbuild/models/iris/1/iris.onnx \
    MLBUILD_NO_CODE_FRAMEWORK=onnx \
    MLBUILD_SCHEMA_INPUT=/var/mlbuild/samples/input.json \
    MLBUILD_SCHEMA_OUTPUT=/var/mlbuild/samples/output.json \
    MLBUILD_SERVICE_NAME=iris \
    MLBUILD_AUTH=none

LABEL org.opencontainers.image.title="onnx-nocode-iris" \
      org.opencontainers.image.description="mlbuild service iris of project onnx-nocode" \
      dev.mlbuild.project="onnx-nocode" \
      dev.mlbuild.service="iris" \
      dev.mlbuild.models="iris:1"

USER mlbuild
WORKDIR /var/mlbuild/app
EXPOSE 5001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5001/healthz/ready', timeout=2)"]
CMD ["python", "-m", "mlbuild.runtime", "--host", "0.0.0.0", "--port", "5001"]

# Models.
COPY models/iris/1/ /var/mlbuild/models/iris/1/

COPY samples/ /var/mlbuild/samples/
# Source and entry script.
