# fewstep on a CUDA host: docker build -t fewstep . && docker run --gpus all -p 8000:8000 -v /models:/models \
#     -e FEWSTEP_API_KEYS=change-me fewstep fewstep serve --model /models/sd-turbo --host 0.0.0.0
# The base image already has a CUDA build of torch; pip keeps it (pyproject asks for torch>=2.4 only).
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/fewstep
COPY pyproject.toml README.md ./
COPY server ./server
COPY engines ./engines
COPY kernels ./kernels
COPY clients ./clients
COPY benchmarks ./benchmarks
COPY training ./training
# [ray]: the same image runs the Ray Serve app (fewstep serve --replicas N, or as a KubeRay RayService's head and
# worker image: deploy/ray/rayservice.yaml)
RUN pip install ".[triton,ray]" && python -c "import fewstep.server, fewstep.engines, fewstep.kernels, fewstep.clients, fewstep.server.ray"

EXPOSE 8000
# fewstep binds 127.0.0.1 unless told otherwise; in a container it must listen on 0.0.0.0 to be reachable through
# the published port. Whenever that port is reachable by others, set API keys (FEWSTEP_API_KEYS=k1,k2 or --api-key
# KEY): without them anyone who can reach it can generate. After SIGTERM the server exits within --shutdown-grace
# (10 s) + 5 s: stop it with `docker stop -t 20`, or Docker's default 10 s ends in SIGKILL.
# No model downloads at run time: mount a diffusers-format directory and pass --model, or use the embedded default.
# One GPU per replica across the container's GPUs: docker run --gpus all ... fewstep serve --replicas 2 --host 0.0.0.0
CMD ["fewstep", "serve", "--host", "0.0.0.0", "--port", "8000"]
