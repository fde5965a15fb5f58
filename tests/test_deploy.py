"""The deployment files start real meterware command lines, checked here as real processes.

``compose.yaml`` is checked against the compose-spec schema (``tests/data/compose-spec.json``), and every
command it, the Dockerfile, the systemd unit and the Kubernetes manifests start is run here as a real
process against a real redis-server started with compose's Redis arguments. Docker is not needed: a
container's files are laid out under a temporary root as its mounts place them, each program runs from
this interpreter (``meterware`` and ``uvicorn`` as ``python -m``), and only listening ports are changed
(to free ones). What this cannot check (the image build, the images' tags, a Kubernetes API server) is
listed in docs/deploy.md.
"""

from __future__ import annotations

import configparser
import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
import yaml

from meterware.config import Config
from tests.servers import RedisServer, ServerProcess, child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "meterware-rollup@.service"
KUBERNETES = ROOT / "deploy" / "kubernetes"
#: The programs a deployment file may start; each runs here as ``python -m <program>``.
PROGRAMS = ("meterware", "uvicorn")
#: The options whose value is a port the process listens on.
PORT_OPTIONS = ("--port", "--metrics-port")
#: The secrets compose.yaml reads from the environment, as an operator would set them.
COMPOSE_ENV = {
    "METERWARE_PORTAL_SECRET": secrets.token_urlsafe(32),
    "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(16),
}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[?-])(?P<arg>[^}]*))?\}")
pytestmark = [pytest.mark.redis, pytest.mark.slow]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def compose_spec() -> jsonschema.Draft7Validator:
    """A validator of the compose-spec schema (draft 7, which its ``$schema`` names in a spelling
    jsonschema does not look up)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``, from ``env``."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == "-":
            return arg
        raise KeyError(f"{name} is not set: {arg}")

    return INTERPOLATION.sub(substitute, value)


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), stage by stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def image_instruction(name: str) -> list[str]:
    """The final stage's ENTRYPOINT or CMD (exec form)."""
    (arguments,) = [args for instruction, args in dockerfile_stages()[-1] if instruction == name]
    return list(json.loads(arguments))


def service_argv(service: Mapping[str, Any]) -> list[str]:
    """What a compose service runs: its entry point (the image's unless set) and its command."""
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return [*image_instruction("ENTRYPOINT"), *service.get("command", image_instruction("CMD"))]
    return [*entrypoint, *service.get("command", [])]


def image_services() -> dict[str, list[str]]:
    """The compose services run from the Dockerfile's image, with what each runs."""
    services = compose()["services"].items()
    return {name: service_argv(service) for name, service in services if service.get("build") == "."}


def option(argv: Sequence[str], name: str) -> str:
    """The value of option ``name`` in ``argv``."""
    return argv[argv.index(name) + 1]


def bind_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts: path in the container -> file or folder of the repository."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = ROOT / source
    return mounts


def lay_out(root: Path, mounts: Mapping[str, Path]) -> None:
    """Copy each mounted file or folder to where the container sees it, under ``root``."""
    for target, source in mounts.items():
        where = root / target.lstrip("/")
        where.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, where)
        else:
            shutil.copy(source, where)


def inside(root: Path, value: str) -> str:
    """A container path as this machine sees it under ``root`` (other values unchanged)."""
    mapped = root / value.lstrip("/")
    return str(mapped) if value.startswith("/") and mapped.exists() else value


def local_argv(argv: Sequence[str], root: Path, ports: Mapping[str, int]) -> list[str]:
    """``argv`` as run here: the program from this interpreter, container paths under ``root``, and the
    port options' values replaced by ``ports[value]``."""
    program, *args = argv
    assert program in PROGRAMS, f"{program} is not one of {PROGRAMS}"
    local = [sys.executable, "-m", program]
    for previous, arg in zip(["", *args], args, strict=False):
        local.append(str(ports[arg]) if previous in PORT_OPTIONS else inside(root, arg))
    return local


@pytest.fixture(scope="module")
def compose_redis() -> Iterator[RedisServer]:
    """A real redis-server started with compose.yaml's Redis arguments."""
    program, *args = compose()["services"]["redis"]["command"]
    assert program == "redis-server"
    server = RedisServer(*args).start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(compose_redis: RedisServer) -> str:
    """The URL of compose's Redis, emptied."""
    client = redis.Redis.from_url(compose_redis.url)
    client.flushall()
    client.close()
    return compose_redis.url


def service_env(service: Mapping[str, Any], root: Path, redis_url: str) -> dict[str, str]:
    """A compose service's environment as run here: interpolated, container paths under ``root``, and the
    test's Redis (``redis`` in compose) in ``$METERWARE_REDIS_URL``."""
    env = {
        key: inside(root, interpolate(value, COMPOSE_ENV)) for key, value in service["environment"].items()
    }
    return child_env(**env, METERWARE_REDIS_URL=redis_url)


def cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``meterware ARGS`` as the operator does in a container."""
    command = [sys.executable, "-m", "meterware", *args]
    return subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=60, check=False)


def started(argv: list[str], env: Mapping[str, str], port: int, log: Path) -> ServerProcess:
    return ServerProcess(argv, dict(env), port, log)


def stopped_within(server: ServerProcess, seconds: float, status: int = 0) -> str:
    """SIGTERM ``server``; assert it exits with ``status`` within ``seconds`` (its grace period); return its
    output."""
    begun = time.monotonic()
    output = server.stop(signal.SIGTERM)
    assert server.process.returncode == status, output
    assert time.monotonic() - begun < seconds, output
    return output


def check_worker(argv: Sequence[str], env: Mapping[str, str], tmp_path: Path, grace: float) -> str:
    """Run a worker command line: it serves its metrics, and stops cleanly on SIGTERM within ``grace``."""
    port = free_port()
    local = local_argv(argv, tmp_path, {option(argv, "--metrics-port"): port})
    worker = started(local, env, port, tmp_path / f"worker-{port}.log")
    try:
        response = httpx.get(f"{worker.url}/metrics", timeout=10)
        assert response.status_code == 200
        assert "meterware_rollup_shards_owned" in response.text
    finally:
        output = stopped_within(worker, grace)
    return output


def seconds(duration: str) -> float:
    """A compose duration such as ``30s`` or ``1m30s``, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return float(sum(int(n) * units[u] for n, u in parts))


# -- compose.yaml ------------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec() -> None:
    """compose.yaml is a valid Compose file (the official compose-spec JSON schema)."""
    compose_spec().validate(compose())


def test_compose_schema_catches_a_broken_file() -> None:
    """The schema check can fail: a service with an unknown key is refused."""
    broken = compose()
    broken["services"]["api"]["comand"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        compose_spec().validate(broken)


def test_compose_mounts_only_files_of_the_repository() -> None:
    """Every bind mount and build context names a file or folder of the repository."""
    services = compose()["services"]
    mounts = [source for service in services.values() for source in bind_mounts(service).values()]
    assert {ROOT / "examples/prometheus-rules.yml", ROOT / "examples/grafana-dashboard.json"} <= set(mounts)
    assert ROOT / "deploy/meterware.toml" in mounts
    for source in mounts:
        assert source.exists(), source
    for service in services.values():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()


def test_compose_redis_keeps_the_money(redis_url: str, tmp_path: Path) -> None:
    """Redis runs with AOF, noeviction and a volume, and `meterware doctor` finds it keeps the money."""
    service = compose()["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", service["image"])
    command = service["command"]
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert any(volume.endswith(":/data") for volume in service["volumes"])

    result = cli("doctor", env=child_env(METERWARE_REDIS_URL=redis_url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "maxmemory-policy noeviction" in result.stdout
    assert "AOF on" in result.stdout


def test_compose_secrets_come_from_the_environment() -> None:
    """No secret is written in compose.yaml: each is read from the environment, required."""
    for name, service in compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"SECRET|TOKEN|PASSWORD|API_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}: {key}"


def test_prometheus_scrapes_the_api_and_both_workers_and_loads_the_rules(tmp_path: Path) -> None:
    """Prometheus loads the shipped rules and scrapes each service on the port it listens on; promtool
    accepts the configuration with the files where compose mounts them."""
    services = compose()["services"]
    listening = {}
    for name, argv in image_services().items():
        for flag in PORT_OPTIONS:
            if flag in argv:
                listening[name] = option(argv, flag)
    workers = {name for name, argv in image_services().items() if argv[:2] == ["meterware", "rollup"]}
    assert len(workers) == 2

    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    config = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"{name}:{port}" for name, port in listening.items()}
    assert {"api", *workers} <= set(listening)
    (rules,) = config["rule_files"]
    assert mounts[rules] == ROOT / "examples/prometheus-rules.yml"

    root = tmp_path / "prometheus"
    lay_out(root, mounts)
    local = root / "etc/prometheus/prometheus.yml"
    local.write_text(local.read_text().replace(rules, inside(root, rules)))
    assert shutil.which("promtool"), "promtool is missing: tests/install-deps.sh installs it"
    result = subprocess.run(["promtool", "check", "config", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    """Grafana gets the compose Prometheus as its default data source and the shipped dashboard."""
    services = compose()["services"]
    mounts = bind_mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources/prometheus.yml")["datasources"]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[-1]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    assert source["isDefault"] is True
    (provider,) = load_yaml(provisioning / "dashboards/meterware.yml")["providers"]
    folder = provider["options"]["path"]
    dashboards = {target: path for target, path in mounts.items() if target.startswith(folder + "/")}
    assert list(dashboards.values()) == [ROOT / "examples/grafana-dashboard.json"]


def test_compose_stack_meters_a_call_end_to_end(redis_url: str, tmp_path: Path) -> None:
    """The API and both workers, run as compose runs them: a customer created with the CLI calls the API,
    a worker rolls the call up, the healthchecks pass, and each stops cleanly within its grace period."""
    services = compose()["services"]
    api = services["api"]
    root = tmp_path / "api"
    lay_out(root, bind_mounts(api))
    config_path = api["environment"]["METERWARE_CONFIG"]
    config_file = Path(inside(root, config_path))
    # The spool lives on the container's volume; here, in the temporary root.
    text = config_file.read_text()
    spool = Config.from_file(config_file).pipeline.spool_dir
    assert text.count(f'"{spool}"') == 1
    config_file.write_text(text.replace(f'"{spool}"', f'"{root / spool.lstrip("/")}"'))

    env = service_env(api, root, redis_url)
    assert cli("customers", "create", "acme", "--plan", "tokens", env=env).returncode == 0
    assert cli("credits", "grant", "acme", "1", env=env).returncode == 0
    created = cli("keys", "create", "acme", "--json", env=env)
    key = json.loads(created.stdout)["key"]

    argv = service_argv(api)
    api_port = free_port()
    server = started(
        local_argv(argv, root, {option(argv, "--port"): api_port}), env, api_port, tmp_path / "api.log"
    )
    workers: list[ServerProcess] = []
    try:
        for name in ("rollup-1", "rollup-2"):
            worker_argv = service_argv(services[name])
            port = free_port()
            local = local_argv(worker_argv, root, {option(worker_argv, "--metrics-port"): port})
            worker_env = service_env(services[name], root, redis_url)
            workers.append(started(local, worker_env, port, tmp_path / f"{name}.log"))
        reply = httpx.post(
            f"{server.url}/v1/chat",
            json={"prompt": "one two three"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
        healthchecks = [(api, api_port, option(argv, "--port"))] + [
            (services[name], worker.port, option(service_argv(services[name]), "--metrics-port"))
            for name, worker in zip(("rollup-1", "rollup-2"), workers, strict=True)
        ]
        for service, port, listening in healthchecks:
            kind, program, *args = service["healthcheck"]["test"]
            assert (kind, program) == ("CMD", "python")
            script = args[-1]
            assert f"127.0.0.1:{listening}/" in script
            probe = [sys.executable, *args[:-1], script.replace(f":{listening}/", f":{port}/")]
            assert subprocess.run(probe, timeout=30, check=False).returncode == 0

        deadline = time.monotonic() + 30
        while True:
            usage = json.loads(cli("usage", "acme", "--json", env=env).stdout)
            if usage["meters"]["tokens"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert usage["meters"]["tokens"] == 8  # 3 prompt words + "You said:" and the 3 words
    finally:
        for name, worker in zip(("rollup-1", "rollup-2"), workers, strict=False):
            stopped_within(worker, seconds(services[name]["stop_grace_period"]))
        # uvicorn shuts down the app (its lifespan drains the buffer), then dies of the SIGTERM it caught.
        assert "Application shutdown complete" in stopped_within(server, 30, status=-signal.SIGTERM)


# -- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_builds_a_wheel_and_installs_it_slim_and_non_root() -> None:
    """Two stages on a slim Python: the first builds the wheel, the last installs it with the API's extra,
    without a compiler or pip's cache, and runs as a numeric non-root user with `meterware` as entry point."""
    build, final = dockerfile_stages()
    for stage in (build, final):
        assert re.fullmatch(r"python:3\.1[1-9]-slim( AS \w+)?", stage[0][1])
    assert any(i == "RUN" and "python -m build --wheel" in args for i, args in build)
    (install,) = [args for i, args in final if i == "RUN" and "pip install" in args]
    assert re.search(r"meterware-\*\.whl\)\[[a-z,]*fastapi", install)
    environment = " ".join(args for i, args in final if i == "ENV").split()
    assert "PIP_NO_CACHE_DIR=1" in environment or "--no-cache-dir" in install
    assert not re.search(r"\b(gcc|build-essential|apt-get)\b", "\n".join(args for _, args in final))
    (user,) = [args for i, args in final if i == "USER"]
    assert user.isdigit()
    assert int(user) != 0
    assert image_instruction("ENTRYPOINT") == ["meterware"]


def test_dockerfile_build_context_is_enough_to_build_the_wheel(tmp_path: Path) -> None:
    """The files the build stage copies (all that .dockerignore lets in) build the wheel."""
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied = [args.split()[:-1] for i, args in dockerfile_stages()[0] if i == "COPY"]
    for sources in copied:
        for copied_path in sources:
            assert copied_path.rstrip("/") in allowed, copied_path
    context = tmp_path / "context"
    for name in allowed:
        source, target = ROOT / name, context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(context)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "dist").glob("meterware-*-py3-none-any.whl"))) == 1


def test_image_default_command_runs_the_worker(redis_url: str, tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD is a rollup worker that serves its metrics and stops on SIGTERM."""
    argv = [*image_instruction("ENTRYPOINT"), *image_instruction("CMD")]
    check_worker(argv, child_env(METERWARE_REDIS_URL=redis_url), tmp_path, grace=30)


# -- systemd ------------------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_systemd_unit_is_hardened_and_restarts_on_failure() -> None:
    """The unit runs as its own user, restarts on failure (not on a configuration error), is sandboxed,
    reads its secrets from an EnvironmentFile, and gives the graceful stop time."""
    service = unit()["Service"]
    expected = {
        "User": "meterware",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["EnvironmentFile"].startswith("-/etc/meterware/")
    # The stop: a step, then up to 10 s of webhook delivery, then releasing the claims.
    assert int(service["TimeoutStopSec"]) >= 20


def test_systemd_unit_starts_a_real_worker(redis_url: str, tmp_path: Path) -> None:
    """ExecStart (the instance name as metrics port) runs a worker that stops within TimeoutStopSec."""
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/meterware/venv/bin/meterware"
    assert option(argv, "--metrics-port") == "%i"
    config = service["Environment"].removeprefix("METERWARE_CONFIG=")
    root = tmp_path / "host"
    lay_out(root, {config: ROOT / "deploy/meterware.toml"})
    env = child_env(METERWARE_CONFIG=inside(root, config), METERWARE_REDIS_URL=redis_url)
    check_worker(["meterware", *argv[1:]], env, root, grace=float(service["TimeoutStopSec"]))


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd-analyze finds nothing wrong in the unit (the binary pointed at this venv's)."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: tests/install-deps.sh installs it"
    program = shutil.which("meterware", path=str(Path(sys.executable).parent)) or sys.executable
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/meterware/venv/bin/meterware", program))
    instance = tmp_path / UNIT.name.replace("@", "@9464")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stdout + result.stderr, result.stdout + result.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of deploy/kubernetes, by kind/name."""
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def container_env(container: Mapping[str, Any], secret: Mapping[str, str], root: Path) -> dict[str, str]:
    """A container's environment, its secretKeyRef values taken from ``secret`` (the Secret's data)."""
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = inside(root, variable["value"])
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "meterware"
            if ref["key"] in secret:
                env[variable["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional") is True, ref
    return env


def pod_root(
    spec: Mapping[str, Any], container: Mapping[str, Any], objects: Mapping[str, Any], root: Path
) -> None:
    """Lay out the ConfigMap volumes a container mounts, under ``root``."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        config_map = objects[f"ConfigMap/{volumes[mount['name']]['configMap']['name']}"]
        for name, text in config_map["data"].items():
            path = root / mount["mountPath"].lstrip("/") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def test_kubernetes_manifests_have_what_they_need() -> None:
    """A worker Deployment and two CronJobs (period close, export), each with what its kind needs, run as
    non-root from the image, on the ConfigMap's configuration, which meterware accepts."""
    objects = manifests()
    config = tomllib.loads(objects["ConfigMap/meterware-config"]["data"]["meterware.toml"])
    Config.from_dict(config)
    workloads = [o for o in objects.values() if o["kind"] in ("Deployment", "CronJob")]
    assert sorted(o["kind"] for o in workloads) == ["CronJob", "CronJob", "Deployment"]
    for workload in workloads:
        assert workload["apiVersion"] == {"Deployment": "apps/v1", "CronJob": "batch/v1"}[workload["kind"]]
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        assert container["image"]
        assert container["args"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        if workload["kind"] == "CronJob":
            assert len(workload["spec"]["schedule"].split()) == 5
            assert spec["restartPolicy"] in ("OnFailure", "Never")
    commands = {tuple(pod_spec(o)["containers"][0]["args"][:2]) for o in workloads}
    assert {("rollup", "--metrics-port"), ("periods", "close"), ("export", "openmeter")} == commands


def test_kubernetes_worker_exposes_its_metrics_port() -> None:
    """The Deployment's container port, scrape annotation and probes are the worker's --metrics-port."""
    deployment = manifests()["Deployment/meterware-rollup"]
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    port = option(container["args"], "--metrics-port")
    assert option(container["args"], "--metrics-host") == "0.0.0.0"
    (declared,) = container["ports"]
    assert str(declared["containerPort"]) == port
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {
            "path": annotations["prometheus.io/path"],
            "port": declared["name"],
        }
    assert template["spec"]["terminationGracePeriodSeconds"] >= 20


def test_kubernetes_worker_runs(redis_url: str, tmp_path: Path) -> None:
    """The Deployment's container runs a worker that answers its probe and stops within the grace period."""
    objects = manifests()
    deployment = objects["Deployment/meterware-rollup"]
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    pod_root(spec, container, objects, tmp_path)
    env = child_env(**container_env(container, {"redis-url": redis_url}, tmp_path))
    argv = [*image_instruction("ENTRYPOINT"), *container["args"]]
    check_worker(argv, env, tmp_path, grace=spec["terminationGracePeriodSeconds"])


def test_kubernetes_cronjobs_close_periods_and_export(redis_url: str, tmp_path: Path) -> None:
    """The CronJobs' commands run: period close closes the period a customer finished, export runs (with
    nothing to send it makes no request)."""
    objects = manifests()
    secret = {"redis-url": redis_url, "openmeter-api-key": "om_test"}
    outputs = {}
    for name in ("meterware-periods-close", "meterware-export-openmeter"):
        spec = pod_spec(objects[f"CronJob/{name}"])
        (container,) = spec["containers"]
        root = tmp_path / name
        pod_root(spec, container, objects, root)
        env = child_env(**container_env(container, secret, root))
        if name == "meterware-periods-close":
            anchor = int(time.time()) - 40 * 86_400  # a month-long period ended about 10 days ago
            created = cli("customers", "create", "acme", "--plan", "payg", "--anchor", str(anchor), env=env)
            assert created.returncode == 0, created.stderr
        argv = [*image_instruction("ENTRYPOINT"), *container["args"]]
        result = subprocess.run(
            local_argv(argv, root, {}), env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[name] = result.stdout
    assert outputs["meterware-periods-close"].startswith("closed ")
    assert "sent 0 events, 0 requests" in outputs["meterware-export-openmeter"]
