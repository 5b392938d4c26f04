# syntax=docker/dockerfile:1
# The pipeline CLI in a container: `docker build -t hymoerec .` (CPU), or with the CUDA build of torch:
#   docker build --build-arg TORCH_VARIANT=cu128 -t hymoerec:cuda .   (run with `--gpus all`)
# The CUDA wheels of torch carry the CUDA runtime, so one slim Python base serves both; the host needs only the
# NVIDIA driver and container toolkit. Versions come from constraints.txt, the lock CI installs from.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu | cu126 | cu128: which build of torch (PyTorch's own wheel index for that variant)
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" -c constraints.txt . \
    && pip check

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="hymoerec-pipeline" \
      org.opencontainers.image.description="HyMoERec sequential recommendation pipeline (DVC stages, MLflow, Airflow DAG)"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 hymoe \
    && useradd --uid 10001 --gid hymoe --create-home --home-dir /home/hymoe hymoe
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=hymoe:hymoe params.yaml dvc.yaml ./
COPY --chown=hymoe:hymoe dags ./dags
USER 10001:10001
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
