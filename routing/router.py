"""Which model serves a request.

For now the small model serves every "auto" request; uncertainty-driven
fallback to the large model lands here (routing issue).
"""

from __future__ import annotations

from typing import Protocol


class ModelDirectory(Protocol):
    def model_meta(self, model: str): ...


class Router:
    def __init__(self, directory: ModelDirectory, default_model: str) -> None:
        self.directory = directory
        self.default_model = default_model

    def choose(self, requested: str) -> str:
        model = self.default_model if requested == "auto" else requested
        self.directory.model_meta(model)  # raises InvalidRequest naming the valid models
        return model
