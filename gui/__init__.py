"""Operator GUI (PyQt5 + pyqtgraph). One module per panel; devices are only
touched from worker threads (gui/workers.py), the engine only through its API
and its document stream (gui/doc_bridge.py)."""
