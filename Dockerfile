# One image for the Ray head (with the shardprop service), Ray workers and the CLI.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN groupadd --system shardprop && useradd --system --gid shardprop --create-home shardprop
WORKDIR /opt/shardprop
COPY pyproject.toml README.md ./
COPY core core
COPY workers workers
COPY service service
RUN pip install . && mkdir -p /data /var/lib/shardprop && chown shardprop:shardprop /data /var/lib/shardprop
USER shardprop
ENV HOME=/home/shardprop
# 8470: shardprop API and dashboard; 6379: Ray GCS; 8080: Ray metrics export
EXPOSE 8470 6379 8080
CMD ["shardprop", "--help"]
