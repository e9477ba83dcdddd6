"""Helpers shared by tests (fixtures are in tests/conftest.py).

ROOT: the repository."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
