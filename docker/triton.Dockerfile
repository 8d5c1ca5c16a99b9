# The NVIDIA Triton Inference Server with what the streamrec stage models import (numpy, pandas,
# onnxruntime, faiss, redis, feast) in the image's own Python, which runs every Python-backend
# model. The model repository is not part of the image: `streamrec serve triton` exports it into
# a volume (see docker-compose.yml). Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t streamrec-triton .
#   docker build -f docker/triton.Dockerfile --build-arg GPU=1 -t streamrec-triton:gpu .
#
# 24.12 = Triton 2.53, Ubuntu 24.04 with Python 3.12, CUDA 12.6 (GPUs of compute capability 6.0+).
FROM nvcr.io/nvidia/tritonserver:24.12-py3

# GPU=1 swaps in onnxruntime-gpu and faiss-gpu (CUDA 12), the project's `gpu` extra.
ARG GPU=0

# Ubuntu 24.04 marks its Python as externally managed; this image exists to extend it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY docker/triton-requirements.txt /tmp/triton-requirements.txt
RUN python3 -m pip install --no-cache-dir -r /tmp/triton-requirements.txt \
 && if [ "$GPU" = "1" ]; then \
      python3 -m pip uninstall -y onnxruntime faiss-cpu \
      && python3 -m pip install --no-cache-dir onnxruntime-gpu==1.31.1 faiss-gpu-cu12==1.14.1.post1; \
    fi \
 && python3 -c "import numpy, pandas, onnxruntime, faiss, redis, feast; \
assert numpy.__version__.startswith('1.'), numpy.__version__" \
 && rm /tmp/triton-requirements.txt

RUN groupadd --system --gid 10001 streamrec \
 && useradd --system --uid 10001 --gid streamrec --create-home --home-dir /home/streamrec \
      --shell /usr/sbin/nologin streamrec

USER streamrec
WORKDIR /home/streamrec

EXPOSE 8000 8001 8002

CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
     "--load-model=*", "--strict-readiness=true", "--exit-timeout-secs=10"]
