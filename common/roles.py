"""The device roles of a setup. A setup names each driver by its role, so
role names are also driver names in errors and in the setup config."""

ROLES = ("sem", "stage", "ion_gun", "waveform_generator", "multimeter", "current_preamp", "electron_source")
