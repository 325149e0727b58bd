"""Fault injection on real processes: network namespaces, a checker for their logs.

`netns.Lab` builds the hosts and injects faults, `impair` is the userspace netem it
uses (this kernel has no `sch_netem`), `cluster` runs fip-sidecar nodes and the API
emulator in a lab, and `checker` judges their logs. `bench/compare.py` reuses all of it.
"""
