"""Check emulator responses against DigitalOcean's own OpenAPI excerpt.

The excerpt lives beside the repository (`../shared/do-openapi`, where CI has it too). Its
YAML files `$ref` each other by relative path; a `referencing` registry loads them on
demand so the schemas are used exactly as published (the droplet, region, image and size
models included). A file the excerpt does not copy would resolve to the empty schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30ReadValidator, oas30_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

REPO = Path(__file__).resolve().parents[2]


def _find_spec_dir() -> Path:
    """`shared/do-openapi/specification` beside the repository, or beside an ancestor of it
    (a git worktree under `wt/NAME` sits one level deeper than the main checkout)."""
    candidates = [base / "shared" / "do-openapi" / "specification" for base in REPO.parents]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SPEC_DIR = _find_spec_dir()
MISSING_REASON = f"DigitalOcean OpenAPI excerpt not found at {SPEC_DIR}"

# (method, path pattern) -> the operation file that documents it, relative to SPEC_DIR.
OPERATIONS: list[tuple[str, re.Pattern[str], str]] = [
    (
        "GET",
        re.compile(r"/v2/(reserved|floating)_ips"),
        "resources/reserved_ips/reservedIPs_list.yml",
    ),
    (
        "GET",
        re.compile(r"/v2/(reserved|floating)_ips/[^/]+"),
        "resources/reserved_ips/reservedIPs_get.yml",
    ),
    (
        "GET",
        re.compile(r"/v2/(reserved|floating)_ips/[^/]+/actions"),
        "resources/reserved_ips/reservedIPsActions_list.yml",
    ),
    (
        "POST",
        re.compile(r"/v2/(reserved|floating)_ips/[^/]+/actions"),
        "resources/reserved_ips/reservedIPsActions_post.yml",
    ),
    (
        "GET",
        re.compile(r"/v2/(reserved|floating)_ips/[^/]+/actions/[^/]+"),
        "resources/reserved_ips/reservedIPsActions_get.yml",
    ),
    ("GET", re.compile(r"/v2/reserved_ipv6"), "resources/reserved_ipv6/reservedIPv6_list.yml"),
    (
        "GET",
        re.compile(r"/v2/reserved_ipv6/[^/]+"),
        "resources/reserved_ipv6/reservedIPv6_get.yml",
    ),
    (
        "POST",
        re.compile(r"/v2/reserved_ipv6/[^/]+/actions"),
        "resources/reserved_ipv6/reservedIPv6Actions_post.yml",
    ),
    ("GET", re.compile(r"/v2/actions"), "resources/actions/actions_list.yml"),
    ("GET", re.compile(r"/v2/actions/[^/]+"), "resources/actions/actions_get.yml"),
    ("GET", re.compile(r"/v2/droplets"), "resources/droplets/droplets_list.yml"),
    ("GET", re.compile(r"/v2/droplets/[^/]+"), "resources/droplets/droplets_get.yml"),
]
DEFAULT_OPERATION = (
    "resources/actions/actions_get.yml"  # any operation: its `default` is the error body
)


def spec_present() -> bool:
    return (SPEC_DIR / "shared" / "models" / "error.yml").is_file()


def _retrieve(uri: str) -> Resource[Any]:
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        return Resource.from_contents({}, default_specification=DRAFT4)
    return Resource.from_contents(yaml.safe_load(path.read_text()), default_specification=DRAFT4)


@cache
def _registry() -> Registry[Any]:
    return Registry(retrieve=_retrieve)  # type: ignore[call-arg]


def _load(relative: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SPEC_DIR / relative).read_text())
    return loaded


def operation_for(method: str, path: str) -> str:
    for op_method, pattern, operation in OPERATIONS:
        if op_method == method and pattern.fullmatch(path):
            return operation
    return DEFAULT_OPERATION


@dataclass(frozen=True)
class ResponseSpec:
    """The documented response of one operation for one status code."""

    file: Path
    headers: dict[str, Any]
    validator: OAS30ReadValidator


@cache
def response_spec(operation: str, status: int) -> ResponseSpec:
    responses = _load(operation)["responses"]
    entry = responses.get(str(status), responses["default"])
    response_file = (SPEC_DIR / operation).parent / entry["$ref"]
    response_file = response_file.resolve()
    document = yaml.safe_load(response_file.read_text())
    schema = {"$ref": f"file://{response_file}#/content/application~1json/schema"}
    validator = OAS30ReadValidator(
        schema, registry=_registry(), format_checker=oas30_format_checker
    )
    return ResponseSpec(response_file, document.get("headers", {}), validator)


# The spec's 2xx schemas list their keys without `required`; the real API always sends them.
TOP_LEVEL_KEYS = {
    "resources/reserved_ips/reservedIPs_list.yml": {"reserved_ips", "links", "meta"},
    "resources/reserved_ips/reservedIPs_get.yml": {"reserved_ip"},
    "resources/reserved_ips/reservedIPsActions_list.yml": {"actions", "links", "meta"},
    "resources/reserved_ips/reservedIPsActions_post.yml": {"action"},
    "resources/reserved_ips/reservedIPsActions_get.yml": {"action"},
    "resources/reserved_ipv6/reservedIPv6_list.yml": {"reserved_ipv6s", "links", "meta"},
    "resources/reserved_ipv6/reservedIPv6_get.yml": {"reserved_ipv6"},
    "resources/reserved_ipv6/reservedIPv6Actions_post.yml": {"action"},
    "resources/actions/actions_list.yml": {"actions", "links", "meta"},
    "resources/actions/actions_get.yml": {"action"},
    "resources/droplets/droplets_list.yml": {"droplets", "links", "meta"},
    "resources/droplets/droplets_get.yml": {"droplet"},
}


def as_reserved_ip_body(path: str, body: Any) -> Any:
    """A legacy `/v2/floating_ips` body with its keys renamed to the documented ones."""
    if not path.startswith("/v2/floating_ips") or not isinstance(body, dict):
        return body
    renamed = {"floating_ip": "reserved_ip", "floating_ips": "reserved_ips"}
    return {renamed.get(key, key): value for key, value in body.items()}


def check_response(method: str, path: str, status: int, body: Any, headers: dict[str, str]) -> str:
    """Assert `body` and the rate-limit headers match the spec; return the file used."""
    operation = operation_for(method, path)
    spec = response_spec(operation, status)
    body = as_reserved_ip_body(path, body)
    if 200 <= status < 300:
        missing = TOP_LEVEL_KEYS.get(operation, set()) - set(body)
        assert not missing, f"{method} {path} -> {status} lacks {sorted(missing)}"
    errors = sorted(spec.validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} -> {status} does not match {spec.file}: " + "; ".join(
        f"{list(e.path)}: {e.message}" for e in errors
    )
    for name in spec.headers:
        assert name in headers, f"{method} {path} -> {status} lacks header {name}"
        assert re.fullmatch(r"\d+", headers[name]), f"{name}: {headers[name]!r} is not an integer"
    return str(spec.file)
