"""Droplet-side ("guest") steps for reserved addresses: `fip-guest` (see cli.py).

The sidecar runs unprivileged; these steps need CAP_NET_ADMIN and run outside it, either as
hooks through a narrow sudo rule or as a separate helper that follows `/status`.
"""
