"""The compose stack, its Dockerfiles and Prometheus config, checked as files (no Docker engine).

The Compose Specification schema is vendored in deploy/compose-spec.json (see deploy/README.md
for its source and license), so the check needs no network.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from schemas.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy" / "compose-spec.json"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "alerts.yml"
DOCS = ROOT / "docs" / "PRODUCTION.md"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, on the file's text."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        value, op = env.get(name), m["op"] or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return m["arg"] if unset else value
        if op.endswith("?") and unset:
            raise KeyError(f"required variable {name} is not set: {m['arg']}")
        return value or ""

    return _VAR.sub(sub, text)


def variables(text: str) -> dict[str, str]:
    """The interpolation variables of a compose file and their operators ('' for none)."""
    return {
        m["braced"] or m["named"]: m["op"] or "" for m in _VAR.finditer(text) if not m["escaped"]
    }


TEST_ENV = {"KAFKA_PASSWORD": "kafka-test-secret", "REDIS_PASSWORD": "redis-test-secret"}


def compose_text() -> str:
    """The compose file without its comment lines (Compose interpolates values, not comments)."""
    return re.sub(r"(?m)^\s*#.*\n", "", COMPOSE.read_text())


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate(compose_text(), TEST_ENV if env is None else env))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def settings_path(name: str) -> str | None:
    """The Settings field a STREAMREC_* variable sets (e.g. 'kafka_security.sasl_username'),
    or None when pydantic-settings would ignore it; nested fields use '__'."""
    prefix = Settings.model_config["env_prefix"]
    delimiter = Settings.model_config["env_nested_delimiter"]
    if not name.upper().startswith(prefix):
        return None
    model: type[BaseModel] | None = Settings
    path = []
    for part in name[len(prefix) :].lower().split(delimiter):
        if model is None or part not in model.model_fields:
            return None
        path.append(part)
        annotation = model.model_fields[part].annotation
        candidates = (annotation, *get_args(annotation))
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return ".".join(path)


# --- the compose file ---------------------------------------------------------------------------


def test_vendored_schema_is_a_json_schema():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def test_compose_file_matches_the_compose_specification(compose):
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_required_variables_fail_loudly_and_are_documented():
    text = compose_text()
    required = {name for name, op in variables(text).items() if op.endswith("?")}
    assert {"KAFKA_PASSWORD", "REDIS_PASSWORD"} <= required
    docs = DOCS.read_text()
    for name in required:
        assert name in docs, f"{name} is required by docker-compose.yml but not in {DOCS.name}"


def test_every_streamrec_variable_is_a_setting(compose):
    names = {
        (service_name, var)
        for service_name, service in compose["services"].items()
        for var in environment(service)
        if var.upper().startswith("STREAMREC_")
    }
    assert names, "no STREAMREC_* variable in docker-compose.yml"
    unknown = sorted(f"{service}: {var}" for service, var in names if settings_path(var) is None)
    assert not unknown, f"not fields of schemas.settings.Settings: {unknown}"


def test_app_services_environment_round_trips_through_settings(compose, monkeypatch):
    """Each service's STREAMREC_* environment, read by pydantic-settings itself, sets the field
    `settings_path` names to the value given (nothing is silently ignored)."""
    services = compose["services"]
    for name in ("topics", "train", "model-export", "workers"):
        env = environment(services[name])
        for var in [v for v in os.environ if v.upper().startswith("STREAMREC_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, str(value))
        settings = Settings()
        for var, value in env.items():
            if var.upper().startswith("STREAMREC_"):
                field: Any = settings
                for part in settings_path(var).split("."):
                    field = getattr(field, part)
                want = str(value).lower() == "true" if isinstance(field, bool) else str(value)
                got = field if isinstance(field, bool) else str(field)
                assert got == want, f"{name}: {var}={value!r} gave {field!r}"
        assert settings.kafka_bootstrap.split(":")[0] == "kafka"
        assert settings.redis_url.startswith("redis://:redis-test-secret@redis:")
        assert settings.triton_url.split(":")[0] == "triton"
        assert settings.kafka_security.protocol == "SASL_PLAINTEXT"
        assert settings.kafka_security.sasl_password == "kafka-test-secret"
    assert services["model-export"]["command"][:3] == ["streamrec", "serve", "triton"]


def test_published_ports_bind_localhost_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"


def test_backend_network_is_internal_and_redis_unpublished(compose):
    assert compose["networks"]["backend"]["internal"] is True
    assert "ports" not in compose["services"]["redis"]
    assert "ports" not in compose["services"]["workers"]


def test_start_order_uses_health_and_completion(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no health check"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is not one-shot"
    depends = {name: set(s.get("depends_on") or {}) for name, s in services.items()}
    assert {"topics", "triton", "redis", "schema-registry"} <= depends["workers"]
    assert "model-export" in depends["triton"]
    for name in ("kafka", "redis", "schema-registry", "triton", "workers", "prometheus"):
        assert "healthcheck" in services[name], name


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image name"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image} is not pinned"


def test_workers_scale_by_variable_and_triton_has_shm(compose):
    assert "WORKER_REPLICAS" in variables(compose_text())
    scaled = load_compose(TEST_ENV | {"WORKER_REPLICAS": "5"})
    assert scaled["services"]["workers"]["deploy"]["replicas"] == 5
    triton = compose["services"]["triton"]
    assert triton["shm_size"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    export_volumes = compose["services"]["model-export"]["volumes"]
    repo_volume = next(v.split(":")[0] for v in triton["volumes"] if ":/models" in v)
    assert any(
        v.startswith(f"{repo_volume}:/var/lib/streamrec/run/triton/models") for v in export_volumes
    ), "model-export must write the repository Triton reads"


def test_every_read_only_volume_has_a_writer(compose):
    mounts: dict[str, set[str]] = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, _, rest = volume.partition(":")
            if source in compose["volumes"]:
                mounts.setdefault(source, set()).add("ro" if rest.endswith(":ro") else "rw")
    readers_only = [v for v, modes in mounts.items() if modes == {"ro"}]
    assert not readers_only, f"volumes nobody writes: {readers_only}"
    assert set(compose["volumes"]) <= set(mounts), set(compose["volumes"]) - set(mounts)


# --- Dockerfiles --------------------------------------------------------------------------------


def built_images(compose) -> dict[str, Path]:
    out = {}
    for name, service in compose["services"].items():
        if build := service.get("build"):
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            out[name] = context / (dockerfile or "Dockerfile")
    return out


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_built_images_have_dockerfiles_that_run_as_non_root(compose):
    images = built_images(compose)
    assert {"workers", "triton"} <= set(images)
    for name, dockerfile in images.items():
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        users = [arg.split(":")[0] for op, arg in instructions(dockerfile) if op == "USER"]
        assert users, f"{dockerfile.name} has no USER line"
        assert users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
        for op, arg in instructions(dockerfile):
            if op == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    if not src.startswith("--"):
                        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"


def test_app_image_installs_the_pinned_project():
    ops = instructions(ROOT / "docker" / "app.Dockerfile")
    base = next(arg for op, arg in ops if op == "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    runs = " ".join(arg for op, arg in ops if op == "RUN")
    assert "pip install --no-cache-dir" in runs and "pyproject.toml" in runs
    assert re.search(r"pip install --no-cache-dir (--no-deps )?\.", runs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"].startswith(">=3.11")
    unpinned = [d for d in project["dependencies"] if "==" not in d]
    assert not unpinned, f"unpinned dependencies in pyproject.toml: {unpinned}"


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
    return pins


def test_triton_image_is_ngc_with_the_projects_serving_pins():
    ops = instructions(ROOT / "docker" / "triton.Dockerfile")
    base = next(arg for op, arg in ops if op == "FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base
    requirements = (ROOT / "docker" / "triton-requirements.txt").read_text().splitlines()
    triton = _pins(requirements)
    project = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for package in ("numpy", "pandas", "onnxruntime", "faiss-cpu", "redis", "feast"):
        assert triton[package] == project[package], f"{package}: Triton and pyproject differ"
    assert int(triton["numpy"].split(".")[0]) < 2
    shared = {p for p in triton if p in project}
    drift = {p: (triton[p], project[p]) for p in shared if triton[p] != project[p]}
    assert not drift, f"pins differ between docker/triton-requirements.txt and pyproject: {drift}"


def test_dockerignore_keeps_local_state_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".streamrec", ".env"} <= ignored


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_services_of_the_stack(compose):
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = compose["services"]
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= {t.rsplit(":", 1)[0] for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            targets |= set(dns["names"])
            assert str(dns["port"]) == environment(services["workers"])["STREAMREC_METRICS_PORT"]
    assert {"workers", "triton"} <= targets
    assert targets - {"localhost"} <= set(services), targets - set(services)
    assert "--metrics-port=8002" in services["triton"]["command"]
    assert "triton:8002" in PROMETHEUS.read_text()
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert {"./deploy/prometheus.yml", "./deploy/alerts.yml"} <= mounted


def test_alerts_use_metrics_the_workers_export():
    from prometheus_client import Counter, Gauge, Histogram

    from streams import metrics

    suffixes = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}
    exported = {
        m._name + suffix  # noqa: SLF001 - the registered name
        for m in vars(metrics).values()
        if type(m) in suffixes
        for suffix in suffixes[type(m)]
    }
    # The Triton pool's, read from its servers when scraped: here from one stand-in server.
    triton = type(metrics._TRITON)()  # noqa: SLF001
    triton.pool = SimpleNamespace(servers=[SimpleNamespace(url="t:1", healthy=True, answered=0)])
    exported |= {s.name for family in triton.collect() for s in family.samples}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    used = {name for r in rules for name in re.findall(r"\bstreamrec_\w+", r["expr"])}
    assert used and used <= exported, used - exported
