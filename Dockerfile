# GPU image for clusters: NVIDIA's PyTorch base (CUDA, cuDNN, NCCL, torch) + this project + flash-attn.
# Build: docker build -t diffv2 .    Run: see README "Docker".
FROM nvcr.io/nvidia/pytorch:25.10-py3

# NCCL defaults for multi-node InfiniBand/RoCE clusters; override at `docker run -e` time.
ENV NCCL_IB_DISABLE=0 \
    NCCL_SOCKET_IFNAME=^lo,docker \
    NCCL_ASYNC_ERROR_HANDLING=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_X_DISABLE_STATS=true

WORKDIR /workspace/diffv2
COPY . .

# The base image's torch satisfies the pin; flash-attn builds against it (no build isolation).
RUN pip install --no-cache-dir -e '.[test]' \
 && pip install --no-cache-dir --no-build-isolation 'flash-attn>=2.8'

CMD ["python", "train.py"]
