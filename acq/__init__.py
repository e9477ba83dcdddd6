"""Acquisition: plans, engine, writers, QC, journal."""
