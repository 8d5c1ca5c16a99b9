# streamrec workers and CLI: `streamrec ...`, and one Faust stream worker per container
# (`python -m faust -A streams.app worker`). Build from the repository root:
#   docker build -f docker/app.Dockerfile -t streamrec-app .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2

RUN groupadd --system --gid 10001 streamrec \
 && useradd --system --uid 10001 --gid streamrec --create-home --home-dir /home/streamrec \
      --shell /usr/sbin/nologin streamrec

WORKDIR /opt/streamrec

# 1. The pinned dependencies of pyproject.toml, in a layer of their own (rebuilt only when
#    pyproject.toml changes).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2. The project itself (its dependencies are all in place already).
COPY schemas ./schemas
COPY streams ./streams
COPY serving ./serving
COPY models ./models
COPY streamrec ./streamrec
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info

COPY docker/train.sh /opt/streamrec/bin/

# Writable state of the non-root user; the compose file mounts named volumes here, which
# inherit this ownership when they are created.
RUN mkdir -p /var/lib/streamrec/run/triton/models /var/lib/streamrec/run/feature_repo \
      /var/lib/streamrec/artifacts /var/lib/streamrec/data \
 && chown -R streamrec:streamrec /var/lib/streamrec \
 && chmod 0755 /opt/streamrec/bin/train.sh

ENV STREAMREC_RUN_DIR=/var/lib/streamrec/run \
    STREAMREC_ARTIFACT_DIR=/var/lib/streamrec/artifacts \
    STREAMREC_DATA_DIR=/var/lib/streamrec/data

USER streamrec
WORKDIR /var/lib/streamrec

CMD ["streamrec", "--help"]
