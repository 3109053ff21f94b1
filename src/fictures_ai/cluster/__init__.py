"""``fictures-ai serve --ray``: the same API on Ray Serve, with replicas per model
(``docs/scaling.md``). Needs the ``cluster`` extra (``pip install fictures-ai[cluster]``)."""
