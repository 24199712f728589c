"""Fixtures for tests that drive a real ComfyUI server process (filled in by the server harness)."""
