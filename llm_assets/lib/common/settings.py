"""Settings classes: every workflow's knobs, each a field with its default and its description.

A workflow's settings are a pydantic model (`Settings`): plain Python for lib, and at the same time
the Dagster config of the asset that runs it (`class PretrainConfig(dg.Config, PretrainSettings)` in
defs), so the launchpad shows the very fields, defaults and descriptions written here. An asset
config adds only what belongs to the asset (gate thresholds, a process count); `settings_of` takes
the workflow's part back out:

    >>> from pydantic import Field
    >>> class DemoSettings(Settings):
    ...     steps: int = Field(10, description="Optimizer steps.")
    >>> class DemoConfig(DemoSettings):  # in defs: class DemoConfig(dg.Config, DemoSettings)
    ...     min_accuracy: float = Field(0.7, description="Gate: the asset fails below this.")
    >>> settings_of(DemoConfig(steps=3), DemoSettings)
    DemoSettings(steps=3)
    >>> try:  # a typo fails loudly, naming the field
    ...     DemoSettings(step=3)
    ... except ValueError as e:
    ...     print(e.errors()[0]["loc"], e.errors()[0]["type"])
    ('step',) extra_forbidden
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict

S = TypeVar("S", bound=BaseModel)


class Settings(BaseModel):
    """Base of the settings classes: an unknown field is an error, never a silently kept default."""

    model_config = ConfigDict(extra="forbid")


def settings_of(config: BaseModel, cls: type[S]) -> S:
    """The `cls` fields of `config` (an asset config that extends `cls`) as a plain `cls`."""
    return cls.model_validate(config.model_dump(include=set(cls.model_fields)))
