"""Autofocus and stigmation: methods that estimate WD and stigmator corrections from images."""
