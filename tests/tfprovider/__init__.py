"""Run the real Terraform against a stand-in DigitalOcean provider (see provider.py).

`install(directory)` lays out a filesystem mirror holding the stand-in under the real
provider's address and version, and a CLI config file that makes `terraform init` install
from that mirror only (TF_CLI_CONFIG_FILE points at it). Nothing is downloaded.
`Workspace` runs init/plan/apply on a copy of terraform/; `user_data_by_node(apply(...))`
gives each member's user_data as Terraform itself rendered it (for rehearsals).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "digitalocean.schema.json"
PROVIDER_SOURCE = "registry.terraform.io/digitalocean/digitalocean"


def schema_version() -> str:
    """The provider version the committed schema was rebuilt from."""
    version: str = json.loads(SCHEMA_FILE.read_text())["provider_version"]
    return version


def terraform_binary() -> str | None:
    return shutil.which("terraform")


@dataclass(frozen=True)
class StandIn:
    mirror: Path
    cli_config: Path
    version: str


def install(directory: Path, python: str = sys.executable) -> StandIn:
    """A filesystem mirror (unpacked layout) with the stand-in as the provider's executable."""
    version = schema_version()
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    target = directory / "mirror" / PROVIDER_SOURCE / version / f"linux_{machine}"
    target.mkdir(parents=True, exist_ok=True)
    executable = target / f"terraform-provider-digitalocean_v{version}"
    executable.write_text(f'#!/bin/sh\nexec "{python}" "{HERE / "provider.py"}" "$@"\n')
    executable.chmod(0o755)
    cli_config = directory / "terraform.rc"
    cli_config.write_text(
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = "{directory / "mirror"}"\n'
        f'    include = ["{PROVIDER_SOURCE}"]\n  }}\n'
        "}\n"
        "disable_checkpoint = true\n"
    )
    return StandIn(directory / "mirror", cli_config, version)


def terraform_env(home: Path, cli_config: Path) -> dict[str, str]:
    """The environment for every terraform call: the mirror only, no checkpoint, no prompts."""
    return {
        **os.environ,
        "HOME": str(home),
        "TF_CLI_CONFIG_FILE": str(cli_config),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
    }


@dataclass
class Outcome:
    """One `terraform plan/apply -json` run: its exit code and diagnostics."""

    returncode: int
    diagnostics: list[dict[str, Any]]
    output: str

    def messages(self, severity: str = "error") -> list[str]:
        return [
            f"{d.get('summary', '')}: {d.get('detail', '')}"
            for d in self.diagnostics
            if d.get("severity") == severity
        ]


class Workspace:
    """A copy of terraform/ initialised against the stand-in, in a directory of its own (its
    .terraform, lock file and local state stay out of the repository)."""

    def __init__(self, source: Path, directory: Path, stand_in: StandIn, binary: str) -> None:
        self.path = directory / "terraform"
        shutil.copytree(
            source, self.path, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*")
        )
        self.binary = binary
        self.env = terraform_env(directory, stand_in.cli_config)
        self.run("init", "-no-color")

    def run(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *arguments],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"terraform {arguments[0]} failed:\n{result.stdout}{result.stderr}"
            )
        return result

    def _var_file(self, variables: Mapping[str, Any]) -> str:
        path = self.path / "test.tfvars.json"
        path.write_text(json.dumps(variables))
        return f"-var-file={path}"

    def _json_run(self, *arguments: str) -> Outcome:
        result = self.run(*arguments, "-json", check=False)
        diagnostics = []
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("type") == "diagnostic":
                    diagnostics.append(event["diagnostic"])
        return Outcome(result.returncode, diagnostics, result.stdout + result.stderr)

    def plan(self, variables: Mapping[str, Any], *extra: str) -> tuple[Outcome, dict[str, Any]]:
        """Plan to a file; returns the run and `terraform show -json` of the plan ({} if none)."""
        plan_file = self.path / "test.tfplan"
        plan_file.unlink(missing_ok=True)
        outcome = self._json_run(
            "plan", "-input=false", self._var_file(variables), f"-out={plan_file}", *extra
        )
        if outcome.returncode != 0:
            return outcome, {}
        return outcome, json.loads(self.run("show", "-json", str(plan_file)).stdout)

    def apply(self, variables: Mapping[str, Any], *extra: str) -> dict[str, Any]:
        """Apply with the stand-in (it calls no API); `terraform show -json` of the state."""
        outcome = self._json_run(
            "apply", "-input=false", "-auto-approve", self._var_file(variables), *extra
        )
        assert outcome.returncode == 0, outcome.output
        return dict(json.loads(self.run("show", "-json").stdout))


def state_resources(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Address -> attribute values, from `terraform show -json` of a state."""
    return {r["address"]: r["values"] for r in state["values"]["root_module"]["resources"]}


def user_data_by_node(state: Mapping[str, Any]) -> dict[int, str]:
    """Each member's rendered user_data (node id -> cloud-config), as Terraform rendered it."""
    resources = state_resources(state)
    return {
        1: resources["digitalocean_droplet.eligible[0]"]["user_data"],
        2: resources["digitalocean_droplet.eligible[1]"]["user_data"],
        3: resources["digitalocean_droplet.witness"]["user_data"],
    }
