# bertflow on Ray: the image the RayCronJob from `bertflow schedule` runs (head and workers), or any
# KubeRay RayCluster / RayJob that runs bertflow.
#
#   docker build -t bertflow:0.1.0 .                                   # GPU workers (CUDA torch)
#   docker build --build-arg RAY_FLAVOR=py311-cpu -t bertflow:0.1.0-cpu .   # CPU-only clusters
#   docker push <registry>/bertflow:0.1.0; bertflow schedule SPEC --cron ... --image <registry>/bertflow:0.1.0
#
# The base is the rayproject/ray image of the Ray version the project is tested with (RAY_VERSION
# in pipelines/dag/schedule.py; tests/test_schedule.py checks that both agree with the installed Ray
# and with pyproject.toml's requirement); Ray stays the base image's (pip is constrained to it).
ARG RAY_VERSION=2.60.0
ARG RAY_FLAVOR=py311-gpu
FROM rayproject/ray:${RAY_VERSION}-${RAY_FLAVOR}
ARG RAY_VERSION

WORKDIR /workspace/bertflow
COPY --chown=ray:users pyproject.toml README.md constraints-cpu.txt ./
COPY --chown=ray:users bert ./bert
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users data ./data
RUN echo "ray==${RAY_VERSION}" > /tmp/ray-pin.txt \
    && pip install --no-cache-dir -c /tmp/ray-pin.txt -e . \
    && python -c "import ray, bert, pipelines.cli; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
    && bertflow --version

# Where the RayCronJob mounts its shared volume (PVC bertflow-workdir): workdirs, datasets, specs.
ENV BERTFLOW_DATASETS=/mnt/bertflow/datasets \
    BERTFLOW_WORKDIR=/mnt/bertflow/work
