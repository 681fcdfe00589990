# posttrain flow runner (CPU). One image for every CPU role of docker/compose.yml: the
# `posttrain` CLI (the entrypoint), a Prefect process worker, the Prefect server and the
# MLflow server (the project pins prefect, mlflow and psycopg2-binary, so the servers run on
# exactly the versions the tests use). Training in this image runs on the CPU profiles
# (cpu, cpu_ddp); GPU training is docker/training-worker.Dockerfile.
#
#   docker build -f docker/flow-runner.Dockerfile -t posttrain/flow-runner .   # from the repo root
#   docker run --rm posttrain/flow-runner validate examples/news_topics/spec.yaml
#
# No HEALTHCHECK here: what "healthy" means depends on the role (Prefect API, MLflow, worker),
# so docker/compose.yml gives each service its own.
FROM python:3.11-slim

# torch first, from the CPU index, so nothing later can pull a multi-GB CUDA build;
# constraints.txt then holds torch==2.13.0 (which the +cpu build satisfies)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_HOME=/data/prefect \
    OMP_NUM_THREADS=1

WORKDIR /app

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# the dependencies alone (from pyproject.toml), so a code change does not reinstall them
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# the code, installed editable: training.launch, the skills loader and the spec resolve
# training/accelerate/, skills/ and examples/ next to the packages, i.e. under /app.
# The demo warehouse is built into the image so `posttrain run examples/news_topics/spec.yaml`
# works in a container (*.db is excluded from the build context).
COPY . .
RUN pip install --no-cache-dir --no-deps -c constraints.txt -e . \
    && python examples/news_topics/build_warehouse.py

# non-root; /data holds what a container writes (runs, MLflow artifacts, PREFECT_HOME) and is
# where docker/compose.yml mounts its volumes (a new named volume takes this ownership)
RUN useradd --create-home --uid 10001 --user-group posttrain \
    && mkdir -p /data/runs /data/mlflow-artifacts /data/prefect \
    && chown -R posttrain:posttrain /data
# numeric, so Kubernetes `runAsNonRoot` can verify it
USER 10001:10001

# Prefect server, MLflow server, a worker's health endpoint (--with-healthcheck)
EXPOSE 4200 5000 8080

ENTRYPOINT ["posttrain"]
CMD ["--help"]
