"""Rebuild the DigitalOcean provider's schema offline, as `terraform providers schema -json`.

The real provider cannot be downloaded on these machines, so the stand-in provider
(tests/tfprovider/provider.py) serves a schema rebuilt from two PyPI packages generated from it:

- `cdktf-cdktf-provider-digitalocean` ships TypeScript sources (inside the source maps of its
  jsii package) generated from `terraform providers schema -json`: every attribute carries a
  `// name - computed: X, optional: Y, required: Z` comment, settable attributes and nested
  blocks are listed with their type (`simple`/`list`/`set`/`map`, `isBlock`), computed-only
  ones have a typed getter (`getStringAttribute`, `Fn.tolist(getListAttribute(...))` for a
  set, `new FooList(this, "name", wrapsSet)` for a list/set of objects).
- `pulumi-digitalocean` carries the deprecation messages (`warnings.warn(...)` in the
  `*Args` classes) and sensitive attributes (`additional_secret_outputs`).

Two things neither package records are taken from the provider's Go source at the same
version and kept in EXTRAS below, for the resources this repository's terraform/ uses:
`ForceNew` (which attribute changes replace the resource: it is what makes a plan say
"must be replaced") and `StringInSlice` validations. Run:

    python tests/tfprovider/extract_schema.py            # pip-downloads both wheels
    python tests/tfprovider/extract_schema.py --cdktf W1.whl --pulumi W2.whl

It writes tests/tfprovider/digitalocean.schema.json (about the provider version it came from,
see `format_version`/`provider_version`). Tests never download: they read the committed file.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "digitalocean.schema.json"
PROVIDER = "registry.terraform.io/digitalocean/digitalocean"
CDKTF_PACKAGE = "cdktf-cdktf-provider-digitalocean==13.14.1"
PULUMI_PACKAGE = "pulumi-digitalocean==4.84.1"

# From the provider's Go source at the version the cdktf package was generated from (v2.71.0):
# attributes with `ForceNew: true` and `validation.StringInSlice` lists, for the resources
# terraform/ uses. Everything else in the schema comes from the packages above.
EXTRAS: dict[str, dict[str, Any]] = {
    "digitalocean_droplet": {
        "force_new": [
            "image",
            "region",
            "ssh_keys",
            "user_data",
            "monitoring",
            "droplet_agent",
            "vpc_uuid",
        ]
    },
    "digitalocean_tag": {"force_new": ["name"]},
    "digitalocean_reserved_ip": {"force_new": ["region"]},
    "digitalocean_vpc": {"force_new": ["region", "ip_range"]},
    "digitalocean_project_resources": {"force_new": ["project"]},
    "digitalocean_uptime_check": {"one_of": {"type": ["ping", "http", "https"]}},
    "digitalocean_uptime_alert": {
        "one_of": {
            "type": ["latency", "down", "down_global", "ssl_expiry"],
            "comparison": ["greater_than", "less_than"],
            "period": ["2m", "3m", "5m", "10m", "15m", "30m", "1h"],
        }
    },
    "digitalocean_project": {
        "one_of_ignore_case": {"environment": ["development", "staging", "production"]}
    },
}

_FLAGS = re.compile(
    r"^  // (\w+) - computed: (true|false), optional: (true|false), required: (true|false)$", re.M
)
_HCL_ENTRY = re.compile(
    r"(\w+): \{\s*value: ([^\n]*),\s*isBlock: (true|false),\s*"
    r'type: "(\w+)",\s*storageClassType: "(\w+)",\s*\}'
)
_PRIMITIVES = {"string": "string", "number": "number", "boolean": "bool"}


def typescript_sources(jsii_tarball: bytes) -> Iterator[str]:
    """The TypeScript of every module (a lib/ folder, whose big modules split their structs
    into several files), from the source maps inlined in the jsii package."""
    modules: dict[str, list[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(jsii_tarball)) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.name.endswith(".js") or len(parts) < 4 or parts[1] != "lib":
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            text = handle.read().decode()
            match = re.search(r"sourceMappingURL=data:application/json;base64,(\S+)", text)
            if match:
                sources = json.loads(base64.b64decode(match[1]))["sourcesContent"]
                modules.setdefault(parts[2], []).extend(sources)
    for sources in modules.values():
        yield "\n".join(sources)


def top_level_bodies(source: str, opener: re.Pattern[str]) -> dict[str, str]:
    """Name -> body of every top-level class or function (bodies end at a `}` in column 0)."""
    bodies: dict[str, str] = {}
    for match in opener.finditer(source):
        end = source.find("\n}", match.end())
        bodies[match[1]] = source[match.end() : end]
    return bodies


class Module:
    """One generated TypeScript module: a resource, data source or the provider."""

    def __init__(self, source: str) -> None:
        self.classes = top_level_bodies(
            source, re.compile(r"^export class (\w+) extends cdktf\.\w+ \{", re.M)
        )
        self.functions = top_level_bodies(
            source, re.compile(r"^export function (\w+)ToHclTerraform\(", re.M)
        )
        self.kind = next(
            (
                kind
                for kind in ("TerraformResource", "TerraformDataSource", "TerraformProvider")
                if f"extends cdktf.{kind} {{" in source
            ),
            None,
        )
        match = re.search(r'tfResourceType = "(\w+)"', source)
        self.type_name = match[1] if match else ""
        self.main = next(
            (
                name
                for name, body in self.classes.items()
                if "synthesizeHclAttributes" in body and "tfResourceType" in body
            ),
            "",
        )

    def block(self, class_body: str, settable: str) -> dict[str, Any]:
        """A schema block from a class's flag comments plus its settable-attribute table."""
        entries = {m[1]: m for m in _HCL_ENTRY.finditer(settable)}
        sections = list(_FLAGS.finditer(class_body))
        attributes: dict[str, Any] = {}
        block_types: dict[str, Any] = {}
        for index, flags in enumerate(sections):
            name = flags[1]
            end = sections[index + 1].start() if index + 1 < len(sections) else len(class_body)
            section = class_body[flags.end() : end]
            computed, optional, required = (flags[i] == "true" for i in (2, 3, 4))
            entry = entries.get(name)
            if entry is not None and entry[3] == "true":
                block_types[name] = self.nested_block(name, entry, section, required)
                continue
            attribute: dict[str, Any] = {
                "type": self.settable_type(entry) if entry else self.computed_type(name, section)
            }
            for key, flag in (("required", required), ("optional", optional)):
                if flag:
                    attribute[key] = True
            if computed:
                attribute["computed"] = True
            attributes[name] = attribute
        block: dict[str, Any] = {"attributes": attributes}
        if block_types:
            block["block_types"] = block_types
        return block

    def nested_block(
        self, name: str, entry: re.Match[str], section: str, required: bool
    ) -> dict[str, Any]:
        function = next(
            m[1]
            for m in re.finditer(r"(?<!cdktf\.)\b([a-z]\w*)ToHclTerraform\b", entry[2])
            if m[1] in self.functions
        )
        struct = function[0].upper() + function[1:]
        reference = self.classes.get(f"{struct}OutputReference", "")
        nested: dict[str, Any] = {
            "nesting_mode": {"list": "list", "set": "set", "struct": "single"}[entry[4]],
            "block": self.block(reference, self.functions[function]),
        }
        if entry[4] == "list" and f"new {struct}OutputReference(this, " in section:
            nested["max_items"] = 1  # cdktf models a MaxItems: 1 list as one object
        if required and entry[4] != "struct":
            nested["min_items"] = 1
        return nested

    @staticmethod
    def settable_type(entry: re.Match[str]) -> Any:
        kind, storage = entry[4], entry[5]
        for suffix, wrapper in (("List", kind), ("Map", "map")):
            if storage.endswith(suffix) and storage[: -len(suffix)] in _PRIMITIVES:
                return [wrapper, _PRIMITIVES[storage[: -len(suffix)]]]
        return _PRIMITIVES[storage]

    def computed_type(self, name: str, section: str) -> Any:
        getter = re.search(r"this\.get(\w*?)Attribute\('" + name + r"'\)", section)
        if getter:
            simple = {"String": "string", "Number": "number", "Boolean": "bool"}
            collections = {
                "List": "string",
                "NumberList": "number",
                "StringMap": "string",
                "NumberMap": "number",
                "BooleanMap": "bool",
            }
            if getter[1] in simple:
                return simple[getter[1]]
            element = collections[getter[1]]
            if getter[1].endswith("Map"):
                return ["map", element]
            return ["set" if "Fn.tolist(" in section else "list", element]
        for kind, element in (("String", "string"), ("Number", "number"), ("Boolean", "bool")):
            if f'new cdktf.{kind}Map(this, "{name}")' in section:
                return ["map", element]
        objects = re.search(
            r'new (\w+?)(List|OutputReference)\(this, "' + name + r'"(, (\w+))?', section
        )
        if objects is None:
            raise ValueError(f"{self.type_name}.{name}: no type found in {section[:200]!r}")
        inner = self.block(self.classes[f"{objects[1]}OutputReference"], "")
        fields = {key: value["type"] for key, value in inner["attributes"].items()}
        return ["set" if objects[4] == "true" else "list", ["object", fields]]


def pulumi_annotations(wheel: zipfile.ZipFile) -> dict[str, dict[str, Any]]:
    """Deprecation messages and sensitive attributes, by Terraform type name."""
    found: dict[str, dict[str, Any]] = {}
    for info in wheel.infolist():
        path = info.filename
        if not path.startswith("pulumi_digitalocean/") or path.count("/") != 1:
            continue
        stem = Path(path).stem
        if stem.startswith("_") or stem.startswith("get_"):
            continue
        text = wheel.read(info).decode()
        deprecated = {
            m[1]: m[2]
            for m in re.finditer(
                r"if (\w+) is not None:\s*\n\s*"
                r"warnings\.warn\(\"\"\"(.*?)\"\"\", DeprecationWarning\)",
                text,
                re.S,
            )
        }
        secrets = re.search(r"additional_secret_outputs=\[([^\]]*)\]", text)
        sensitive = re.findall(r'"(\w+)"', secrets[1]) if secrets else []
        found[f"digitalocean_{stem}"] = {"deprecated": deprecated, "sensitive": sensitive}
    return found


def annotate(block: dict[str, Any], notes: dict[str, Any]) -> None:
    for name, message in notes.get("deprecated", {}).items():
        if name in block["attributes"]:
            block["attributes"][name]["deprecated"] = True
            block["attributes"][name]["description"] = message
    for name in notes.get("sensitive", []):
        if name in block["attributes"]:
            block["attributes"][name]["sensitive"] = True


def build(cdktf_wheel: Path, pulumi_wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(cdktf_wheel) as wheel:
        (tarball,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        sources = list(typescript_sources(wheel.read(tarball)))
    version = re.search(r"providerVersion: '([\d.]+)'", "\n".join(sources[:5]))
    assert version is not None
    resources: dict[str, Any] = {}
    data_sources: dict[str, Any] = {}
    provider: dict[str, Any] = {}
    for source in sources:
        module = Module(source)
        if module.kind is None or not module.main:
            continue
        body = module.classes[module.main]
        synthesize = body[body.index("synthesizeHclAttributes") :]
        block = module.block(body, synthesize)
        if module.kind == "TerraformProvider":
            block["attributes"].pop("alias", None)  # a cdktf meta-argument, not the provider's
            provider = block
        elif module.kind == "TerraformResource":
            resources[module.type_name] = block
        else:
            data_sources[module.type_name] = block
    with zipfile.ZipFile(pulumi_wheel) as wheel:
        notes = pulumi_annotations(wheel)
    for name, block in resources.items():
        annotate(block, notes.get(name, {}))
    provider["attributes"]["token"]["sensitive"] = True
    return {
        "format_version": "1.0",
        "provider_version": version[1],
        "generated_from": [CDKTF_PACKAGE, PULUMI_PACKAGE, "provider Go source (EXTRAS)"],
        "provider_schemas": {
            PROVIDER: {
                "provider": {"version": 0, "block": provider},
                "resource_schemas": {
                    k: {"version": 0, "block": resources[k]} for k in sorted(resources)
                },
                "data_source_schemas": {
                    k: {"version": 0, "block": data_sources[k]} for k in sorted(data_sources)
                },
            }
        },
        "x_stand_in": EXTRAS,
    }


def download(package: str, directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(directory), package],
        check=True,
    )
    name = package.split("==")[0].replace("-", "_")
    (wheel,) = directory.glob(f"{name}-*.whl")
    return wheel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cdktf", type=Path, help=f"wheel of {CDKTF_PACKAGE}")
    parser.add_argument("--pulumi", type=Path, help=f"wheel of {PULUMI_PACKAGE}")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        cdktf = arguments.cdktf or download(CDKTF_PACKAGE, Path(temporary))
        pulumi = arguments.pulumi or download(PULUMI_PACKAGE, Path(temporary))
        schema = build(cdktf, pulumi)
    arguments.output.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    blocks = schema["provider_schemas"][PROVIDER]
    print(
        f"{arguments.output.name}: provider {schema['provider_version']}, "
        f"{len(blocks['resource_schemas'])} resources, "
        f"{len(blocks['data_source_schemas'])} data sources"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
