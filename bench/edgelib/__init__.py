"""Pieces of the edge API benchmark (``bench/edge_api.py``)."""
