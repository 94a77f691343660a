# mnist8k on an NVIDIA GPU:
#   docker build -t mnist8k .
#   docker run --gpus all --shm-size=1g -v "$PWD/mlruns:/mlruns" mnist8k
#
# The CUDA major of the base image matches the torch wheel pinned in pyproject.toml (torch 2.14.1 from
# PyPI is built for CUDA 13.0; tests/test_packaging.py checks the two majors agree). The wheel brings its
# own CUDA libraries and cuDNN (nvidia-* wheels), so the plain `runtime` flavour is enough: the base
# contributes the NVIDIA container settings, including the driver check (CUDA 13 needs driver >= 580).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Ubuntu 24.04's own Python 3.12 (pyproject: requires-python >=3.11,<3.13) in a venv at /opt/venv.
# g++ and the Python headers are for `--compile`: torch.compile builds C++ kernels on a CPU and
# Triton's launcher on CUDA (`trainer` refuses --compile in one line where there is no compiler).
# Apt versions are left to the Ubuntu release: exact pins of security-updated packages stop resolving
# as soon as the archive moves on, which breaks the build rather than making it reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.12 python3.12-venv python3.12-dev g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# PIP_NO_CACHE_DIR also covers the `pip download` that `trainer data` falls back to (no cache in a layer).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/mnist8k/src

# Dependencies first, in their own layer: pyproject.toml's [project].dependencies is the one list of
# pins, read here with tomllib, so editing the source below does not reinstall torch and friends
# (only a change to pyproject.toml does).
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, as a package (its dependencies are already there: --no-deps, and
# `pip check` fails the build if the layer above does not satisfy them).
COPY trainer/ trainer/
COPY models/ models/
RUN pip install --no-cache-dir --no-deps . && pip check

# A non-root user. Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; it is replaced by `mnist8k`
# with the same uid/gid, the usual ids of a desktop user, so files written to a bind-mounted /mlruns
# belong to that user on the host. USER is numeric so that the host (and Kubernetes' runAsNonRoot)
# can tell it is not root without reading the image's /etc/passwd.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid 1000 mnist8k \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash mnist8k \
    && mkdir -p /opt/mnist8k/data /mlruns \
    && chown mnist8k:mnist8k /opt/mnist8k/data /mlruns
USER 1000:1000

# MNIST baked in at build time, md5-verified by `trainer data`. `trainer` checks at every start that
# the folder is writable (it would replace a corrupted file), so the folder is sticky and
# world-writable: `docker run --user <any uid>` works, and the baked files (0644, owned by mnist8k)
# can be neither modified nor replaced by another uid.
RUN trainer data --data-dir /opt/mnist8k/data && chmod 1777 /opt/mnist8k/data/MNIST/raw
ENV MNIST8K_DATA_DIR=/opt/mnist8k/data

# Runs are tracked in a sqlite store under the volume; `-e MLFLOW_TRACKING_URI=http://HOST:5000` logs
# to a tracking server instead. With a sqlite store MLflow puts artifacts in ./mlruns relative to the
# working directory, hence WORKDIR /mlruns: artifacts land in the volume too (/mlruns/mlruns/...).
VOLUME /mlruns
WORKDIR /mlruns
ENV MLFLOW_TRACKING_URI=sqlite:////mlruns/mlflow.db

ENTRYPOINT ["trainer"]
CMD ["train", "--model", "step5"]
