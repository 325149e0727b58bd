"""fip-sidecar: a highly available DigitalOcean reserved (floating) IP for any web service."""

__version__ = "0.1.0"
