"""The base of every section of config.yaml, on both sides: an unknown key is an error (a typo
never passes silently) and a parsed section is frozen (a reload builds a new one)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: ``extra="forbid"``, ``frozen=True``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
