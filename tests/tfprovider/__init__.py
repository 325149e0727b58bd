"""Run the real Terraform against a stand-in DigitalOcean provider (see provider.py).

`install(directory)` lays out a filesystem mirror holding the stand-in under the real
provider's address and version, and a CLI config file that makes `terraform init` install
from that mirror only (point TF_CLI_CONFIG_FILE at it). Nothing is downloaded.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

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
