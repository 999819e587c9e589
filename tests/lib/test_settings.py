"""The settings base class: unknown fields fail, and an asset config gives back its workflow's part."""

import pydantic
import pytest
from pydantic import Field

from llm_assets.lib.common.settings import Settings, settings_of
from llm_assets.lib.posttrain.adapters import AdapterSettings
from llm_assets.lib.posttrain.sft import SftSettings


class Workflow(Settings):
    steps: int = Field(10, description="Optimizer steps.")
    lr: float = Field(1e-3, description="Learning rate.")


class AssetConfig(Workflow):
    min_accuracy: float = Field(0.7, description="Gate threshold: belongs to the asset, not the workflow.")


def test_an_unknown_field_is_an_error_naming_it():
    with pytest.raises(pydantic.ValidationError) as e:
        Workflow(step=3)
    assert e.value.errors()[0]["loc"] == ("step",) and e.value.errors()[0]["type"] == "extra_forbidden"


def test_settings_of_keeps_the_workflow_fields_and_drops_the_assets():
    config = AssetConfig(steps=3, min_accuracy=0.9)
    settings = settings_of(config, Workflow)
    assert type(settings) is Workflow and settings == Workflow(steps=3, lr=1e-3)
    assert not hasattr(settings, "min_accuracy")


def test_a_real_workflow_gives_back_its_adapter():
    sft = SftSettings(method="ia3", r=4, max_steps=7)
    assert settings_of(sft, AdapterSettings) == AdapterSettings(method="ia3", r=4)


def test_every_field_of_a_workflow_has_a_description():
    for cls in (Workflow, AdapterSettings, SftSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name}"
