"""Test harness: throwaway systemd hosts (tier 1) and the skip policy."""
