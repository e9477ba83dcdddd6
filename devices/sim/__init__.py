"""The simulated GCIB-SEM: physics, specimen, wafer, stage, instrument emulators."""
