"""Routing: the rule language (``table``), its model-level face (``engine``), ``lint`` and the
cold-start path for submission hooks (``fast``). Import the submodule you need: this package
imports nothing, so the hot path stays cheap."""
