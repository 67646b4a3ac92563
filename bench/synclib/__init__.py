"""Helper modules of ``bench/sync.py`` (the sync benchmark); see that script's docstring."""
