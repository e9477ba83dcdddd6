"""What every layer uses: atomic writes, crash points, physical constants,
device roles. Imports nothing from the project (the bottom layer)."""
