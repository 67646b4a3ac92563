"""Payment providers the cloud talks to on the edges' behalf (their secret keys stay here).

``base`` is the one interface every provider implements; each module beside it adapts one
provider to it.
"""
