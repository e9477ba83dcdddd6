"""Wafer-level planning for GCIB-SEM: sections, stage-path ordering, tile grids, MagC I/O, post-processing."""
