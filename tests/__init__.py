"""The tests, laid out like the code (docs/architecture.md)."""
