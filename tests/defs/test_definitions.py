import dagster as dg

from llm_assets.definitions import defs

DATA_ASSETS = {"raw_corpus", "clean_corpus", "deduped_shards"}


def test_assets_groups_checks_and_jobs():
    d = defs()
    graph = d.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.materializable_asset_keys}
    assert DATA_ASSETS <= keys
    for name in DATA_ASSETS:
        assert graph.get(dg.AssetKey(name)).group_name == "data"
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("deduped_shards")).parent_keys} == {"clean_corpus"}
    checks = {c.name for c in graph.asset_check_keys}
    assert {"clean_corpus_keeps_most_documents", "deduped_shards_splits_disjoint"} <= checks
    assert d.resolve_job_def("data_job").name == "data_job"
    assert "lake" in d.resources


def test_string_selections_work():
    # dvc pins antlr 4.9 and dagster's selection parser needs 4.13 (see the Makefile): this fails
    # with "ord() expected string of length 1" when the environment is set up wrongly.
    graph = defs().resolve_asset_graph()
    def names(selection: str) -> set[str]:
        return {k.to_user_string() for k in dg.AssetSelection.from_string(selection).resolve(graph)}

    assert DATA_ASSETS <= names("group:data")
    assert names("+deduped_shards") == {"clean_corpus", "deduped_shards"}
