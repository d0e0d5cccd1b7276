"""deploy/compose.yaml, deploy/.env.example and deploy/Dockerfile, checked statically.

No Docker engine runs here: these tests read the files and check them against the code
they deploy (the settings model, the CLI), so a new setting without a pass-through, a
typo in a variable name or a literal secret fails here rather than in a deployment.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.cli import main as cli_main
from pipeline.settings import CONFIG_ENV, ENV_PREFIX, KafkaSettings, Settings, load_settings

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"

SERVICES = ("kafka", "influxdb", "grafana", "worker")
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET")
PLACEHOLDERS = ("", "change-me")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $.
REFERENCE = re.compile(
    r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
)
ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


# --- helpers --------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), "compose.yaml is not a mapping"
    return document


def services() -> dict[str, dict[str, Any]]:
    found = load_compose().get("services")
    assert isinstance(found, dict), "compose.yaml has no services"
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's environment as a mapping; a name with no value is a pass-through."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.partition("=") for item in raw)
        return {name: (value if sep else None) for name, sep, value in pairs}
    return {name: None if value is None else str(value) for name, value in raw.items()}


def worker_env() -> dict[str, str | None]:
    return environment(services()["worker"])


def env_example() -> dict[str, tuple[str, bool]]:
    """Every variable .env.example lists: name -> (value, set). Commented lines are unset."""
    listed: dict[str, tuple[str, bool]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line.strip())
        if match:
            listed[match["name"]] = (match["value"].strip(), not match["comment"])
    return listed


def example_values() -> dict[str, str]:
    """What Compose interpolates from after `cp .env.example .env`."""
    return {name: value for name, (value, is_set) in env_example().items() if is_set}


def strings(node: object) -> Iterator[str]:
    """Every string value in a YAML document: what Compose interpolates (not comments)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def references() -> Iterator[re.Match[str]]:
    for text in strings(load_compose()):
        yield from REFERENCE.finditer(text)


def referenced_variables() -> set[str]:
    """Every variable compose.yaml takes from the environment or .env."""
    names = {match["name"] for match in references()}
    for service in services().values():
        names |= {name for name, value in environment(service).items() if value is None}
    return names


def interpolate(text: str, values: Mapping[str, str]) -> str:
    """Compose's variable substitution, for the forms compose.yaml uses."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = values.get(name)
        # With a colon, empty counts as unset.
        missing = not value if op and op.startswith(":") else value is None
        if op is None or not missing:
            return value or ""
        if op.endswith("?"):
            raise LookupError(f"${{{name}}} is required: {arg}")
        return arg

    return REFERENCE.sub(substitute, text).replace("$$", "$")


def resolved_env(
    service: Mapping[str, Any], values: Mapping[str, str]
) -> Iterator[tuple[str, str]]:
    """The environment a container gets: pass-throughs only when set, like Compose."""
    for name, value in environment(service).items():
        if value is None:
            if name in values:
                yield name, values[name]
        else:
            yield name, interpolate(value, values)


def setting_path(variable: str) -> tuple[str, ...] | None:
    """The setting a WATTSTREAM_* variable sets, split as pipeline.settings does; None if none."""
    if not variable.startswith(ENV_PREFIX):
        return None
    key = variable.removeprefix(ENV_PREFIX).lower()
    if key in Settings.model_fields:
        return (key,)
    area, _, field = key.partition("_")
    info = Settings.model_fields.get(area)
    model = info.annotation if info is not None else None
    if isinstance(model, type) and issubclass(model, BaseModel) and field in model.model_fields:
        return (area, field)
    return None


def kafka_security_variables() -> list[str]:
    fields = [
        name
        for name in KafkaSettings.model_fields
        if name == "security_protocol" or name.startswith(("sasl_", "ssl_"))
    ]
    return [f"{ENV_PREFIX}KAFKA_{name.upper()}" for name in fields]


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def healthcheck_command(service: Mapping[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(part) for part in test]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


# --- the file and its services --------------------------------------------------------


def test_compose_has_the_four_services() -> None:
    assert set(SERVICES) <= set(services()), f"missing: {set(SERVICES) - set(services())}"


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_has_an_image_or_build_and_a_healthcheck(name: str) -> None:
    service = services()[name]
    assert service.get("image") or service.get("build"), f"{name}: no image and no build"
    command = healthcheck_command(service)
    assert command[0] in ("CMD", "CMD-SHELL") and len(command) > 1, f"{name}: {command}"
    assert " ".join(command[1:]).strip() not in ("true", "exit 0", ":"), f"{name}: a no-op"


@pytest.mark.parametrize("name", [n for n in SERVICES if n != "worker"])
def test_images_are_pinned(name: str) -> None:
    image = services()[name]["image"]
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{name}: {image} has no tag"
    assert tag != "latest" and re.match(r"^\d+(\.\d+)+", tag), f"{name}: {image} is not pinned"


def test_kafka_runs_in_kraft_mode_without_zookeeper() -> None:
    kafka = environment(services()["kafka"])
    roles = {role.strip() for role in (kafka.get("KAFKA_PROCESS_ROLES") or "").split(",")}
    assert {"broker", "controller"} <= roles, f"KAFKA_PROCESS_ROLES: {roles}"
    node_id = kafka.get("KAFKA_NODE_ID")
    assert node_id
    assert f"{node_id}@" in (kafka.get("KAFKA_CONTROLLER_QUORUM_VOTERS") or "")
    assert kafka.get("KAFKA_CONTROLLER_LISTENER_NAMES")
    assert "PLAINTEXT://kafka:9092" in (kafka.get("KAFKA_ADVERTISED_LISTENERS") or "")
    for name, service in services().items():
        assert "zookeeper" not in name.lower()
        assert "zookeeper" not in str(service.get("image", "")).lower()
        zookeeper = [key for key in environment(service) if "ZOOKEEPER" in key.upper()]
        assert not zookeeper, f"{name}: {zookeeper}"


def test_stateful_services_keep_their_data_in_named_volumes() -> None:
    named = set(load_compose().get("volumes") or {})
    for name, target in (
        ("kafka", "/var/lib/kafka/data"),
        ("influxdb", "/var/lib/influxdb"),
        ("grafana", "/var/lib/grafana"),
    ):
        mounts = [str(v).split(":") for v in services()[name].get("volumes", [])]
        sources = [m[0] for m in mounts if len(m) >= 2 and m[1] == target]
        assert sources and sources[0] in named, f"{name}: no named volume at {target}"
    kafka_env = environment(services()["kafka"])
    assert kafka_env.get("KAFKA_LOG_DIRS") == "/var/lib/kafka/data"


def test_influxdb_is_1x_with_the_wattstream_database() -> None:
    influxdb = services()["influxdb"]
    assert influxdb["image"].startswith("influxdb:1.")
    database = interpolate(environment(influxdb)["INFLUXDB_DB"] or "", example_values())
    assert database == "wattstream"
    assert any("/ping" in part for part in healthcheck_command(influxdb))


def test_grafana_mounts_the_provisioning_and_dashboards_of_deploy_grafana() -> None:
    grafana = services()["grafana"]
    volumes = [str(v) for v in grafana.get("volumes", [])]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    # Relative host paths are relative to the compose file.
    assert (COMPOSE_FILE.parent / "grafana/provisioning").resolve() == (
        REPO / "deploy/grafana/provisioning"
    )
    assert any("/api/health" in part for part in healthcheck_command(grafana))


def test_depends_on_waits_for_healthy_services() -> None:
    expected = {"worker": {"kafka", "influxdb"}, "grafana": {"influxdb"}}
    for name, service in services().items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on must name a condition"
        for dependency, spec in depends_on.items():
            assert spec.get("condition") == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services()[dependency], f"{dependency} has no healthcheck"
        assert expected.get(name, set()) <= set(depends_on), f"{name}: {set(depends_on)}"


# --- the worker -----------------------------------------------------------------------


def test_worker_is_built_from_deploy_dockerfile_with_the_repo_as_context() -> None:
    build = services()["worker"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_worker_replicas_come_from_env_and_fit_the_partitions(
    clean_env: pytest.MonkeyPatch,
) -> None:
    replicas = str(services()["worker"]["deploy"]["replicas"])
    assert "${WATTSTREAM_WORKERS" in replicas
    values = example_values()
    workers = int(interpolate(replicas, values))
    for name, value in resolved_env(services()["worker"], values):
        if name != CONFIG_ENV:
            clean_env.setenv(name, value)
    partitions = load_settings(None).partitions
    assert 1 <= workers <= partitions, f"{workers} workers for {partitions} partitions"


def test_worker_env_reaches_the_bundled_broker_and_influxdb() -> None:
    env = dict(resolved_env(services()["worker"], example_values()))
    assert env["WATTSTREAM_BROKER"] == "kafka:9092"
    assert env["WATTSTREAM_INFLUX_URL"] == "http://influxdb:8086"
    assert env["WATTSTREAM_INFLUX_API"] == "v1"
    assert env["WATTSTREAM_INFLUX_DATABASE"] == "wattstream"


@pytest.mark.parametrize("variable", kafka_security_variables())
def test_worker_passes_every_kafka_security_setting_through(variable: str) -> None:
    env = worker_env()
    assert variable in env, f"worker does not pass {variable} through"
    value = env[variable]
    # Either a bare pass-through or a reference to the same variable, never a fixed value.
    assert value is None or f"${{{variable}" in value, f"{variable}: {value!r}"


def test_kafka_security_settings_are_derived_from_the_model() -> None:
    derived = set(kafka_security_variables())
    assert {
        "WATTSTREAM_KAFKA_SECURITY_PROTOCOL",
        "WATTSTREAM_KAFKA_SASL_PASSWORD",
        "WATTSTREAM_KAFKA_SSL_CAFILE",
    } <= derived
    assert "WATTSTREAM_KAFKA_SESSION_TIMEOUT_S" not in derived


def test_every_worker_wattstream_variable_is_a_real_setting() -> None:
    unknown = [
        name
        for name in worker_env()
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV and setting_path(name) is None
    ]
    assert not unknown, f"not settings of pipeline.settings.Settings: {unknown}"


def test_setting_path_rejects_typos() -> None:
    assert setting_path("WATTSTREAM_BROKER") == ("broker",)
    assert setting_path("WATTSTREAM_DATA_DIR") == ("data_dir",)
    assert setting_path("WATTSTREAM_INFLUX_RETRY_MAX_S") == ("influx", "retry_max_s")
    assert setting_path("WATTSTREAM_BROKR") is None
    assert setting_path("WATTSTREAM_KAFKA_SASL_PASWORD") is None
    assert setting_path("WATTSTREAM_SITES_ID") is None


def test_worker_env_with_the_example_values_gives_valid_settings(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """What a worker loads after `cp .env.example .env`: the mounted file plus its env."""
    worker = services()["worker"]
    env = dict(resolved_env(worker, example_values()))
    mounts = [interpolate(str(v), example_values()).split(":") for v in worker.get("volumes", [])]
    host_files = [host for host, target, *_ in mounts if target == env[CONFIG_ENV]]
    assert host_files, f"nothing is mounted at {CONFIG_ENV}={env[CONFIG_ENV]}"
    config_file = (COMPOSE_FILE.parent / host_files[0]).resolve()
    assert config_file.is_file(), f"the default config file {config_file} does not exist"
    for name, value in env.items():
        if name != CONFIG_ENV:
            clean_env.setenv(name, value)
    settings = load_settings(config_file)
    assert settings.broker == "kafka:9092"
    assert settings.influx.url == "http://influxdb:8086"
    assert settings.kafka.security_protocol == "PLAINTEXT"
    # TLS paths are left unset, not set to "" (which pydantic would read as ".").
    assert settings.kafka.ssl_cafile is None, "an empty TLS path reads as '.', not as unset"


def test_commented_examples_in_env_example_are_valid_settings(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Uncommenting the example lines of .env.example must give valid settings too."""
    every_value = {name: value for name, (value, _) in env_example().items()}
    commented = {name for name, (_, is_set) in env_example().items() if not is_set}
    env = dict(resolved_env(services()["worker"], every_value))
    assert commented & set(env), "no commented example reaches the worker"
    for name, value in env.items():
        if name != CONFIG_ENV:
            clean_env.setenv(name, value)
    settings = load_settings(None)
    for name in commented & set(env):
        path = setting_path(name)
        assert path is not None, name
        read: Any = settings
        for part in path:
            read = getattr(read, part)
        assert str(read) == every_value[name], f"{name}={every_value[name]!r} read as {read!r}"


def test_worker_healthcheck_runs_code_that_exists() -> None:
    command = healthcheck_command(services()["worker"])
    args = shlex.split(command[1]) if command[0] == "CMD-SHELL" else command[1:]
    if args[0] == "wattstream":
        assert args[1] in cli_main.commands, f"no `wattstream {args[1]}` command"
        return
    assert args[:2] == ["python", "-c"], f"unexpected worker healthcheck {args}"
    tree = ast.parse(args[2])
    imported = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert any(node.module and node.module.startswith("pipeline") for node in imported)
    for node in imported:
        assert node.module is not None
        module = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(module, alias.name), f"{node.module}.{alias.name} does not exist"


# --- variables and secrets ------------------------------------------------------------


def test_every_variable_compose_uses_is_in_env_example() -> None:
    missing = sorted(referenced_variables() - set(env_example()))
    assert not missing, f"compose.yaml uses variables .env.example does not list: {missing}"


def test_env_example_lists_nothing_compose_does_not_use() -> None:
    unused = sorted(set(env_example()) - referenced_variables())
    assert not unused, f".env.example lists variables compose.yaml does not use: {unused}"


def test_env_example_sets_every_required_variable() -> None:
    """`cp .env.example .env; docker compose up` must interpolate without errors."""
    for text in strings(load_compose()):
        interpolate(text, example_values())
    required = [m["name"] for m in references() if m["op"] in (":?", "?") or m["op"] is None]
    for name in required:
        assert example_values().get(name), f"{name} is required but empty in .env.example"


def test_no_literal_secrets_in_compose() -> None:
    for name, service in services().items():
        for key, value in environment(service).items():
            if not is_secret(key):
                continue
            assert value is not None, f"{name}: {key} must be a ${{VAR}} reference"
            match = REFERENCE.fullmatch(value)
            assert match, f"{name}: {key} is a literal, not a ${{VAR}} reference"
            default = match["arg"] if match["op"] in (":-", "-") else ""
            assert not default, f"{name}: {key} has a literal default"


def test_no_real_secrets_in_env_example() -> None:
    secrets = {name: value for name, (value, _) in env_example().items() if is_secret(name)}
    assert "GRAFANA_ADMIN_PASSWORD" in secrets
    for name, value in secrets.items():
        assert value in PLACEHOLDERS, f".env.example: {name} must be empty or a placeholder"


# --- the Dockerfile -------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_runs_the_worker_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    bases = [args for op, args in instructions if op == "FROM"]
    build_args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert build_args.get("PYTHON_IMAGE", "").startswith("python:3.11-slim")
    assert bases and bases[-1] == "${PYTHON_IMAGE}"
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [args for op, args in final_stage if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as root"
    entrypoint = [json.loads(args) for op, args in final_stage if op == "ENTRYPOINT"]
    command = [json.loads(args) for op, args in final_stage if op == "CMD"]
    assert entrypoint == [["wattstream"]]
    assert command == [["worker"]]
    assert command[0][0] in cli_main.commands


def test_dockerfile_copies_every_package_and_bakes_in_no_secret() -> None:
    instructions = dockerfile_instructions()
    sources = {
        source.rstrip("/")
        for op, args in instructions
        if op == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in sources, f"the image does not COPY {pattern}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= sources
    for op, args in instructions:
        if op in ("ENV", "ARG", "LABEL"):
            assert not is_secret(args), f"{op} {args}: no secrets in the image"
        if op == "ENV":
            for name in re.findall(r"\b(WATTSTREAM_[A-Z0-9_]+)=", args):
                assert setting_path(name), f"ENV {name}: not a setting"
