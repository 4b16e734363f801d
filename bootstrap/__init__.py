"""Rootfs bootstrapper: distribution backends and image import."""
