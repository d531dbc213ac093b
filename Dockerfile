# GPU image for clusters: NVIDIA's PyTorch base (CUDA, cuDNN, NCCL, torch) + this project + FlashAttention-4 and -2.
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

# The base image's torch satisfies the pin; flash-attn builds against it (no build isolation). FlashAttention-4 is
# Python + CuTe DSL (no build); `attention.backend=auto` picks it on Hopper/Blackwell. The base image is CUDA 13.
# FlashAttention-4 goes in last: both packages install under `flash_attn/`, and its `flash_attn/cute` must win.
RUN pip install --no-cache-dir -e '.[test]' \
 && pip install --no-cache-dir --no-build-isolation 'flash-attn>=2.8' \
 && pip install --no-cache-dir 'flash-attn-4[cu13]==4.0.0b36'

CMD ["python", "train.py"]
