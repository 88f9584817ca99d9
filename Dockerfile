# The node image of gmpatl-ray's GPU cluster (cluster.yaml): Ray 2.60 on Python 3.11 with CUDA, plus every
# dependency pinned by constraints-gpu.txt (torch 2.14.1 for CUDA 13, RAPIDS cuML) and the project, so a
# node that boots installs nothing. CUDA comes in the wheels; the host needs an NVIDIA driver >= 580
# (cluster.yaml's AMI has one).
#   docker build -t REGISTRY/gmpatl-ray:0.1.0-gpu . && docker push REGISTRY/gmpatl-ray:0.1.0-gpu
FROM rayproject/ray:2.60.0-py311-gpu

# The lock first: this layer stays cached while only the code changes.
COPY --chown=ray:users constraints-gpu.txt /tmp/gmpatl/constraints-gpu.txt
RUN pip install --no-cache-dir -r /tmp/gmpatl/constraints-gpu.txt

COPY --chown=ray:users pyproject.toml README.md /tmp/gmpatl/
COPY --chown=ray:users gmpatl_ray /tmp/gmpatl/gmpatl_ray
# The check imports what a build machine without a GPU can import (cuML needs a driver: it is only found).
RUN pip install --no-cache-dir --no-deps /tmp/gmpatl \
    && python -c "import importlib.util, torch, gmpatl_ray.pipeline; \
assert torch.__version__.startswith('2.14.1'), torch.__version__; \
assert importlib.util.find_spec('cuml'), 'cuML is missing'" \
    && rm -rf /tmp/gmpatl
