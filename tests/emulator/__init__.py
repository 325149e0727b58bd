"""Helpers for the emulator's tests: an OpenAPI response checker and an in-process harness."""
