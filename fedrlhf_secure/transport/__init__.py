"""Transports that carry the project's own wire frames between the server loop and the clients.

The embedded default is in process (:mod:`aggregation.driver`); this package adds Flower
(SuperLink / SuperNodes, flwr 1.42). Flower is an optional extra (``pip install .[flower]``) and is
imported only by the modules here that need it, never by the rest of the package.
"""
