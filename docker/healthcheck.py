"""Container HEALTHCHECK: exit 0 when the sidecar's `/healthz` answers 200, else 1.

Why a script and not curl: the image carries no curl (less to patch), and the status address
is not fixed: it comes from the sidecar's own config (`status_listen`, or the
`FIP_SIDECAR_STATUS_LISTEN` override). The config path is read from PID 1's command line
(`run --config FILE`), so a container started with another config path or CMD is still
checked against the right port. Only the standard library is used, and `http.client` (not
urllib) so that no proxy variable can send the probe elsewhere.
"""

from __future__ import annotations

import http.client
import os
import sys
import tomllib
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/fip-sidecar/config.toml")
DEFAULT_STATUS_LISTEN = "127.0.0.1:9401"
TIMEOUT_SECONDS = 3.0
#: A wildcard listen address is probed on the matching loopback address.
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def config_path_of_pid1(proc: Path = Path("/proc/1")) -> Path:
    """The `--config` argument of the container's main process, resolved against its cwd."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(proc / "cwd"))
    except OSError:
        return DEFAULT_CONFIG
    args = [arg.decode(errors="replace") for arg in argv if arg]
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return cwd / args[index + 1]
        if arg.startswith("--config="):
            return cwd / arg.removeprefix("--config=")
    return DEFAULT_CONFIG


def status_listen(config_path: Path) -> str:
    """`status_listen` as the sidecar sees it: environment override, then file, then default."""
    override = os.environ.get("FIP_SIDECAR_STATUS_LISTEN")
    if override:
        return override.strip().strip('"')
    try:
        data = tomllib.loads(config_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_STATUS_LISTEN
    value = data.get("status_listen", DEFAULT_STATUS_LISTEN)
    return value if isinstance(value, str) else DEFAULT_STATUS_LISTEN


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, with wildcard hosts mapped to loopback."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return WILDCARD_TO_LOOPBACK.get(host, host), int(port)


def probe(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def main() -> int:
    try:
        host, port = split_host_port(status_listen(config_path_of_pid1()))
    except ValueError:
        print("healthcheck: cannot parse status_listen", file=sys.stderr)
        return 1
    healthy = probe(host, port)
    if not healthy:
        print(f"healthcheck: http://{host}:{port}/healthz did not answer 200", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
