# syntax=docker/dockerfile:1
# One image for the app side and the rollup worker: meterware's wheel, with the FastAPI/uvicorn extra the
# example API runs on. docs/deploy.md explains the commands:
#
#   docker build -t meterware:local .
#   docker run --rm meterware:local --help                          # the entry point is `meterware`
#   docker run --rm meterware:local rollup --metrics-port 9464 --metrics-host 0.0.0.0   # the default
#   docker run --rm --entrypoint uvicorn meterware:local myapi:app --host 0.0.0.0      # an app
#
# Python 3.11: ci/constraints.txt (which pins the dependencies installed here) is made on it.

FROM python:3.11-slim AS build
WORKDIR /src
COPY ci/constraints.txt ci/constraints.txt
RUN pip install --no-cache-dir --disable-pip-version-check -c ci/constraints.txt build
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m build --wheel --outdir /dist && cp ci/constraints.txt /dist/


FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    METERWARE_CONFIG=/etc/meterware/meterware.toml
# The wheel is mounted from the build stage, never copied into a layer; the extras' packages all ship
# binary wheels, so no compiler is needed.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install -c /dist/constraints.txt "$(ls /dist/meterware-*.whl)[fastapi,hiredis]" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/meterware --create-home \
       --shell /usr/sbin/nologin meterware
# The app's spool (pipeline.spool_dir in deploy/meterware.toml) lives under the home: mount a volume there.
WORKDIR /var/lib/meterware
# A numeric user, so Kubernetes' runAsNonRoot can check it.
USER 10001
EXPOSE 8000 9464
# No HEALTHCHECK: the same image is an API or a worker; compose.yaml gives each service its own.
ENTRYPOINT ["meterware"]
CMD ["rollup", "--metrics-port", "9464", "--metrics-host", "0.0.0.0"]
