"""Tier 2: a qemu VM with full cgroup v2, booted from a Debian image with pymachine installed."""
