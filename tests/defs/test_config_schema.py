"""Every setting is written once, in lib: the launchpad of each asset shows every field of the lib
settings class its config embeds, with the lib's default and description, and every config field of
every asset is documented."""

import importlib
import pkgutil
import typing
from pathlib import Path

import dagster as dg
import pytest
import yaml
from pydantic import Field

import llm_assets.lib
from llm_assets.definitions import defs
from llm_assets.lib.common.settings import Settings, settings_of
from llm_assets.lib.data.clean import CleanRules
from llm_assets.lib.data.corpus import CorpusSources
from llm_assets.lib.data.dedup import DedupParams
from llm_assets.lib.evaluate.evaluation import EvalSettings
from llm_assets.lib.monitor.drift import DriftSettings
from llm_assets.lib.posttrain.align import AlignSettings
from llm_assets.lib.posttrain.sft import SftSettings
from llm_assets.lib.pretrain.pretrain import PretrainSettings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The lib settings each asset's config is made of (the first class after dg.Config in its bases).
EMBEDS = {"raw_corpus": CorpusSources, "clean_corpus": CleanRules, "deduped_shards": DedupParams,
          "incoming_batch": CleanRules, "base_checkpoint": PretrainSettings, "lora_checkpoint": SftSettings,
          "aligned_checkpoint": AlignSettings, "eval_report": EvalSettings, "drift_report": DriftSettings}


@pytest.fixture(scope="module")
def graph():
    return defs().resolve_asset_graph()


def config_class(assets_def: dg.AssetsDefinition) -> type | None:
    """The class of the asset's `config` argument; None when it takes no config."""
    fn = assets_def.op.compute_fn
    if not fn.has_config_arg():
        return None
    return typing.get_type_hints(fn.decorated_fn)[fn.get_config_arg().name]


def lib_settings(config_cls: type) -> list[type[Settings]]:
    """The lib settings classes a config class is made of (a settings class and its own bases)."""
    return [c for c in config_cls.__mro__ if issubclass(c, Settings) and c is not Settings
            and not issubclass(c, dg.Config)]


def schema_problems(assets_def: dg.AssetsDefinition) -> list[str]:
    """What is wrong with one asset's launchpad schema: a field without a description; a lib settings
    field that is missing, or shown with another default or description than lib's."""
    cls = config_class(assets_def)
    if cls is None:
        return []
    shown = assets_def.op.config_schema.config_type.fields  # what the launchpad renders
    name = assets_def.op.name
    problems = [f"{name}.{k}: no description" for k, f in shown.items() if not (f.description or "").strip()]
    checked = set()
    for lib in lib_settings(cls):  # most derived first: a field a stage gives its own default is checked there
        for k, f in lib.model_fields.items():
            if k in checked:
                continue
            checked.add(k)
            field = shown.get(k)
            if field is None:
                problems.append(f"{name}.{k}: {lib.__name__} field missing from the launchpad")
                continue
            if not (f.description or "").strip():
                problems.append(f"{name}.{k}: {lib.__name__} gives it no description")
            elif field.description != f.description:
                problems.append(f"{name}.{k}: described otherwise than in {lib.__name__}")
            if not field.default_provided or field.default_value != f.default:
                problems.append(f"{name}.{k}: launchpad default "
                                f"{field.default_value if field.default_provided else None!r} != "
                                f"{lib.__name__}'s {f.default!r}")
    return problems


def configured_assets(graph) -> dict[str, dg.AssetsDefinition]:
    found = {}
    for assets_def in graph.assets_defs:
        if assets_def.node_def is not None and config_class(assets_def) is not None:
            found[assets_def.op.name] = assets_def
    return found


def test_every_asset_config_field_is_documented_and_lib_fields_match(graph):
    configured = configured_assets(graph)
    assert set(EMBEDS) <= set(configured)
    problems = [p for assets_def in configured.values() for p in schema_problems(assets_def)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("asset, settings", sorted(EMBEDS.items()), ids=sorted(EMBEDS))
def test_asset_config_is_the_lib_settings_class(graph, asset, settings):
    """No second list of fields: the config subclasses the lib class, adds only fields of its own
    (gates, a process count), and its defaults give the lib's defaults back."""
    cls = config_class(graph.get(dg.AssetKey(asset)).assets_def)
    assert issubclass(cls, settings) and issubclass(cls, dg.Config)
    assert settings_of(cls(), settings) == settings()
    assert all(cls.model_fields[k].description == f.description for k, f in settings.model_fields.items())


def test_every_lib_settings_class_reaches_a_launchpad(graph):
    """Every Settings class in lib is what some asset config is made of (directly or as a base)."""
    embedded = {lib for assets_def in configured_assets(graph).values() for lib in lib_settings(config_class(assets_def))}
    defined = set()
    for info in pkgutil.walk_packages(llm_assets.lib.__path__, "llm_assets.lib."):
        module = importlib.import_module(info.name)
        defined |= {v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Settings)
                    and v is not Settings and v.__module__ == module.__name__}
    assert defined and defined <= embedded, sorted(c.__name__ for c in defined - embedded)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_validate_against_the_launchpad_schema(path):
    """The YAML keys are the settings' field names: renaming or nesting a field breaks this."""
    job = defs().resolve_implicit_global_asset_job_def()
    assert dg.validate_run_config(job, yaml.safe_load(path.read_text()))


class _Steps(Settings):
    steps: int = Field(3, description="Optimizer steps.")
    quiet: bool = False  # a lib field without a description


class _GatedConfig(dg.Config, _Steps):
    min_accuracy: float = 0.5  # an asset field without a description


class _ShadowConfig(dg.Config, _Steps):
    steps: int = Field(4, description="Optimizer steps, written a second time.")  # a hand-kept copy drifts


def test_the_checker_catches_missing_descriptions_and_drifted_copies():
    @dg.asset
    def gated(config: _GatedConfig) -> None: ...

    @dg.asset
    def shadowed(config: _ShadowConfig) -> None: ...

    assert schema_problems(gated) == ["gated.quiet: no description", "gated.min_accuracy: no description",
                                      "gated.quiet: _Steps gives it no description"]
    assert schema_problems(shadowed) == ["shadowed.quiet: no description", "shadowed.steps: described otherwise than in _Steps",
                                         "shadowed.steps: launchpad default 4 != _Steps's 3",
                                         "shadowed.quiet: _Steps gives it no description"]


def test_settings_reject_unknown_fields():
    """A typo in a run config or a test is an error, never a silently kept default."""
    with pytest.raises(ValueError, match="max_step"):
        SftSettings(max_step=10)
    with pytest.raises(ValueError, match="adapter"):
        AlignSettings(adapter={"r": 4})  # the adapter's fields are flat: r=4
