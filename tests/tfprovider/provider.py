"""A stand-in for the DigitalOcean Terraform provider, so the real `terraform init/validate/plan`
run on machines that cannot download it.

It serves the real provider's schema (digitalocean.schema.json, rebuilt offline by
extract_schema.py) over Terraform's plugin protocol v6, through the `tf` package (go-plugin
handshake, gRPC, msgpack values). That is what makes Terraform itself check the configuration:
unknown arguments and blocks, missing required ones, wrong types and setting a computed-only
attribute are all rejected by Terraform core from the schema. On top, like the real provider:

- plan: computed attributes not set in the configuration are unknown on create; a change of
  an attribute the real provider marks `ForceNew` (x_stand_in.force_new) requires replacement;
- validate: `StringInSlice` lists (x_stand_in.one_of) and deprecated arguments (a warning);
- apply: fills unknown values with fake but well-formed ones and calls no API, so a test can
  apply, change a variable and plan again against that state. Nothing is ever created.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from msgpack.ext import ExtType
from tf import runner
from tf.gen import tfplugin_pb2 as pb
from tf.iface import (
    Config,
    CreateContext,
    DataSource,
    DeleteContext,
    PlanContext,
    ReadContext,
    ReadDataContext,
    Resource,
    State,
    UpdateContext,
)
from tf.schema import Attribute, Block, NestedBlock, NestMode, Schema
from tf.types import Unknown
from tf.utils import Diagnostics

SCHEMA_FILE = Path(__file__).resolve().parent / "digitalocean.schema.json"
PROVIDER_ADDRESS = "registry.terraform.io/digitalocean/digitalocean"
PREFIX = "digitalocean_"
_NESTING = {
    "list": pb.Schema.NestedBlock.LIST,
    "set": pb.Schema.NestedBlock.SET,
    "single": pb.Schema.NestedBlock.SINGLE,
    "map": pb.Schema.NestedBlock.MAP,
    "group": pb.Schema.NestedBlock.GROUP,
}
_serial = itertools.count(1)


def is_unknown(value: Any) -> bool:
    """Unknown as `tf` decodes it, or a refined unknown (msgpack extension 12) it passes through."""
    return value is Unknown or isinstance(value, ExtType)


class CtyType:
    """Any Terraform type, given in its JSON form (`"string"`, `["set", "string"]`, ...)."""

    def __init__(self, cty: Any) -> None:
        self.cty = cty

    def tf_type(self) -> bytes:
        return json.dumps(self.cty, separators=(",", ":")).encode()

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, value: Any) -> Any:
        return value

    def semantically_equal(self, a: Any, b: Any) -> bool:
        if isinstance(self.cty, list) and self.cty[0] == "set" and a and b:
            return sorted(map(repr, a)) == sorted(map(repr, b))
        return bool(a == b)


class JsonNestedBlock(NestedBlock):
    """A nested block of any nesting mode (`tf` itself knows only set and single)."""

    def __init__(self, name: str, spec: Mapping[str, Any], block: Block) -> None:
        super().__init__(name, NestMode.Set, block, spec.get("min_items"), spec.get("max_items"))
        self.mode = spec["nesting_mode"]
        self.spec = spec

    def to_pb(self) -> pb.Schema.NestedBlock:
        return pb.Schema.NestedBlock(
            type_name=self.type_name,
            block=self.block.to_pb(),
            nesting=_NESTING[self.mode],
            min_items=self.min_items or 0,
            max_items=self.max_items or 0,
        )

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, value: Any) -> Any:
        return value

    def semantically_equal(self, a: Any, b: Any) -> bool:
        return bool(a == b)


def to_block(spec: Mapping[str, Any], force_new: frozenset[str] = frozenset()) -> Block:
    attributes = [
        Attribute(
            name,
            CtyType(attribute["type"]),
            description=attribute.get("description"),
            required=attribute.get("required", False),
            optional=attribute.get("optional", False),
            computed=attribute.get("computed", False),
            sensitive=attribute.get("sensitive", False),
            deprecated=attribute.get("deprecated", False),
            requires_replace=name in force_new,
        )
        for name, attribute in sorted(spec.get("attributes", {}).items())
    ]
    blocks = [
        JsonNestedBlock(name, nested, to_block(nested["block"]))
        for name, nested in sorted(spec.get("block_types", {}).items())
    ]
    return Block(attributes=attributes, block_types=blocks)


def to_schema(spec: Mapping[str, Any], force_new: frozenset[str] = frozenset()) -> Schema:
    block = to_block(spec["block"], force_new)
    return Schema(
        version=spec.get("version", 0),
        attributes=block.attributes,
        block_types=block.block_types,
    )


def fake_value(type_name: str, name: str, cty: Any) -> Any:
    """A well-formed value for an unknown computed attribute after a pretend apply."""
    n = next(_serial)
    if cty == "string":
        if name == "id" and type_name in {"digitalocean_droplet", "digitalocean_tag"}:
            return str(500000000 + n) if type_name == "digitalocean_droplet" else f"tag-{n}"
        if "ipv6" in name:
            return f"2001:db8::{n:x}"
        if "ip" in name and ("address" in name or name == "ip"):
            return f"198.18.{n // 250}.{n % 250 + 1}"
        if name == "urn":
            return f"do:{type_name.removeprefix(PREFIX)}:{n}"
        return f"{type_name.removeprefix(PREFIX)}-{name}-{n}"
    if cty == "number":
        return n
    if cty == "bool":
        return False
    if isinstance(cty, list) and cty[0] == "object":
        return {key: fake_value(type_name, key, value) for key, value in cty[1].items()}
    return {} if isinstance(cty, list) and cty[0] == "map" else []


def fill_unknowns(type_name: str, spec: Mapping[str, Any], state: Any) -> Any:
    """Replace every unknown in `state` (of block `spec`) with a fake value."""
    if not isinstance(state, dict):
        return state
    filled = dict(state)
    for name, attribute in spec.get("attributes", {}).items():
        if is_unknown(filled.get(name)):
            filled[name] = fake_value(type_name, name, attribute["type"])
    for name, nested in spec.get("block_types", {}).items():
        value = filled.get(name)
        if isinstance(value, list):
            filled[name] = [fill_unknowns(type_name, nested["block"], item) for item in value]
        elif isinstance(value, dict) and nested["nesting_mode"] == "single":
            filled[name] = fill_unknowns(type_name, nested["block"], value)
    return filled


def validate(
    diags: Diagnostics, type_name: str, config: Config, spec: Mapping[str, Any], extras: Any
) -> None:
    """What the real provider checks in ValidateResourceConfig beyond the schema."""
    rules = [(n, a, False) for n, a in extras.get("one_of", {}).items()]
    rules += [(n, a, True) for n, a in extras.get("one_of_ignore_case", {}).items()]
    for name, allowed, ignore_case in rules:
        value = config.get(name)
        if not isinstance(value, str):
            continue
        if (value.lower() if ignore_case else value) not in allowed:
            diags.add_error(
                f"expected {name} to be one of {allowed}, got {value}",
                f"{type_name}.{name}",
                path=[name],
            )
    for name, attribute in spec["attributes"].items():
        if attribute.get("deprecated") and config.get(name) is not None:
            diags.add_warning(
                "Argument is deprecated", attribute.get("description", ""), path=[name]
            )


class FromSchema:
    """A resource or data source type whose schema is one entry of the committed JSON (the
    subclasses DigitalOceanStandIn makes carry it in class attributes)."""

    spec: ClassVar[dict[str, Any]]
    extras: ClassVar[dict[str, Any]] = {}
    type_name: ClassVar[str]

    def __init__(self, provider: object) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return cls.type_name.removeprefix(PREFIX)

    @classmethod
    def get_schema(cls) -> Schema:
        return to_schema(cls.spec, frozenset(cls.extras.get("force_new", [])))


class StandInResource(FromSchema, Resource):
    """One resource type: plans as the real provider would, applies without any API."""

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        validate(diags, type_name, config, self.spec["block"], self.extras)

    def plan(self, ctx: PlanContext, current: State | None, planned: State) -> State:
        return planned

    def create(self, ctx: CreateContext, planned: State) -> State:
        return dict(fill_unknowns(self.type_name, self.spec["block"], planned))

    def read(self, ctx: ReadContext, current: State) -> State:
        return current

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State:
        return dict(fill_unknowns(self.type_name, self.spec["block"], planned))

    def delete(self, ctx: DeleteContext, current: State) -> None:
        return None


class StandInDataSource(FromSchema, DataSource):
    """One data source type: reads return the configuration with fake computed values."""

    def read(self, ctx: ReadDataContext, config: Config) -> State:
        block = self.spec["block"]
        state = {name: config.get(name, Unknown) for name in block.get("attributes", {})}
        for name, attribute in block.get("attributes", {}).items():
            if state[name] is None and attribute.get("computed"):
                state[name] = Unknown
        state.update({name: config.get(name) for name in block.get("block_types", {})})
        return dict(fill_unknowns(self.type_name, block, state))


class DigitalOceanStandIn:
    """The provider: its own configuration block, and every resource and data source type."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        provider = document["provider_schemas"][PROVIDER_ADDRESS]
        self.provider_spec = provider["provider"]
        extras = document.get("x_stand_in", {})
        self.resources = [
            type(
                f"R_{name}",
                (StandInResource,),
                {"spec": spec, "type_name": name, "extras": extras.get(name, {})},
            )
            for name, spec in provider["resource_schemas"].items()
        ]
        self.data_sources = [
            type(f"D_{name}", (StandInDataSource,), {"spec": spec, "type_name": name})
            for name, spec in provider["data_source_schemas"].items()
        ]

    def get_model_prefix(self) -> str:
        return PREFIX

    def full_name(self) -> str:
        return PROVIDER_ADDRESS

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return to_schema(self.provider_spec)

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        return None

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        return None

    def get_data_sources(self) -> list[type[DataSource]]:
        return list(self.data_sources)

    def get_resources(self) -> list[type[Resource]]:
        return list(self.resources)

    def get_functions(self) -> list[Any]:
        return []

    def new_resource(self, klass: type[Resource]) -> Resource:
        return klass(self)

    def new_data_source(self, klass: type[DataSource]) -> DataSource:
        return klass(self)


def main() -> None:
    document = json.loads(SCHEMA_FILE.read_text())
    runner.run_provider(DigitalOceanStandIn(document), sys.argv)


if __name__ == "__main__":
    main()
