"""Autofocus and stigmation: methods that estimate WD and stigmator corrections from images."""


def register_methods() -> list[str]:
    """Add this package's methods (MAPFoSt, DeepFocus and its variants, the
    Nelder–Mead searches) to the acquisition engine's registry
    (acq.autofocus_step). The application calls it once at start-up, before
    any plan is validated; calling it again is harmless. Returns the names."""
    from autofocus.engine_adapter import register_all
    return register_all()
