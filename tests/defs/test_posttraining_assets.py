"""sft_dataset, preference_dataset, lora_checkpoint and aligned_checkpoint on the tiny config, with
user files of every supported format beside the corpus-derived data. preference_dataset generates
its rejected replies with lora_checkpoint, so it runs after it."""

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import POST, UPSTREAM, lock_md5, materialize, metadata
from llm_assets.lib.posttrain.generation import generate_replies, rouge_l_scores
from llm_assets.lib.pretrain.model_dir import load_model


def write_user_files(project: Path) -> None:
    sft, prefs = project / "data/sft", project / "data/preferences"
    alpaca = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."} for i in range(20)]
    (sft / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    (sft / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca[:5]))
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Name {i}?"},
                           {"role": "assistant", "content": f"It is item {i}."}]} for i in range(10)]
    (sft / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    trl = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "maybe"} for i in range(20)]
    trl.append({"prompt": "Same?", "chosen": "identical", "rejected": " identical "})  # dropped, counted: 1 of 21
    (prefs / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    hh = [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: Sure, gladly.",
           "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: No."} for i in range(8)]
    (prefs / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))


def read_splits(project: Path, dataset: str) -> dict[str, list[dict]]:
    return {s: pq.read_table(project / f"data/lake/{dataset}/{s}.parquet").to_pylist() for s in ("train", "validation")}


def lora_greedy_replies(project: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    """lora_checkpoint's greedy reply to each preference row's prompt, one prompt at a time."""
    model_dir = project / "data/lake/lora_checkpoint/merged"
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    return generate_replies(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size=1)


def rebuild_preferences(post, tiny_config, negatives: str) -> tuple[dict, dict]:
    """(metadata, settings) of preference_dataset materialized again with `negatives`."""
    project, instance, _ = post
    cfg = tiny_config(["preference_dataset"])
    cfg["ops"]["preference_dataset"]["config"]["negatives"] = negatives
    assert materialize(project, cfg, ["preference_dataset"], instance).success
    return metadata(instance, "preference_dataset"), cfg["ops"]["preference_dataset"]["config"]


@pytest.fixture(scope="module")
def post(project_factory, tiny_config):
    project = project_factory("post")
    write_user_files(project)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(project, tiny_config(), [*UPSTREAM, "base_checkpoint", *POST], instance)
    return project, instance, result


def test_datasets_mix_corpus_and_user_files(post):
    project, instance, result = post
    assert result.success
    md = metadata(instance, "sft_dataset")
    train, held = read_splits(project, "sft_dataset").values()
    assert md["train_examples"] == len(train) and md["validation_examples"] == len(held)
    assert md["user_files"] == 3
    origins = {r["origin"] for r in train + held}
    assert origins == {"corpus", "alpaca.json", "alpaca.jsonl", "chat.jsonl"}
    assert sum(r["origin"] != "corpus" for r in train + held) == 35
    corpus_train = [r for r in train if r["origin"] == "corpus"]
    assert len(corpus_train) == 200  # max_corpus_pairs in tiny.yaml
    # derived validation chats come from validation modules only: no module on both sides
    held_modules = {r["module"] for r in held if r["origin"] == "corpus"}
    assert held_modules and not held_modules & {r["module"] for r in corpus_train}
    chat = next(r for r in train + held if r["origin"] == "chat.jsonl")
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
    assert lock_md5(project, "sft_dataset") == md["dvc_md5"]

    pm = metadata(instance, "preference_dataset")
    rows = [r for split in read_splits(project, "preference_dataset").values() for r in split]
    assert pm["dropped_identical"] == 1 and pm["dropped_bad_records"] == 1 and "trl.jsonl:21" in pm["bad_records"]
    assert md["dropped_bad_records"] == 0 and md["bad_records"] == "none"
    assert pm["train_pairs"] + pm["validation_pairs"] == len(rows)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
    hh = [r for r in rows if r["source"].startswith("hh.jsonl")]
    assert len(hh) == 8 and hh[0]["chosen"] == "Sure, gladly." and hh[0]["rejected"] == "No."
    assert [m["role"] for m in hh[0]["prompt"]] == ["user", "assistant", "user"]
    assert sum(r["source"].startswith("trl.jsonl") for r in rows) == 20
    assert "ranked" in pm["negatives"] and pm["negatives_from"] == "ranked"


def test_preference_dataset_ranks_the_lora_models_own_replies(post, tiny_config):
    project, instance, _ = post
    pm = metadata(instance, "preference_dataset")
    settings = tiny_config(["preference_dataset"])["ops"]["preference_dataset"]["config"]
    splits = read_splits(project, "preference_dataset")
    ranked = {s: [r for r in rows if r["negative"] == "ranked"] for s, rows in splits.items()}
    assert 0 < len(ranked["train"]) <= settings["max_train_pairs"]  # pairs_per_prompt 1 by default
    assert 0 < len(ranked["validation"]) <= settings["max_validation_pairs"]
    assert pm["generated"] == 5 * (settings["max_train_pairs"] + settings["max_validation_pairs"])  # 1 greedy + 4 samples
    module = lambda r: r["source"].split("::")[0]
    assert not {module(r) for r in ranked["validation"]} & {module(r) for r in ranked["train"]}
    assert "lora_checkpoint" in pm["construction"] and "ROUGE-L" in pm["construction"] and "ranked" in pm["samples"]
    assert 0 <= pm["greedy_is_best_share"] <= 1 and pm["generation_seconds"] > 0
    # chosen scores at least as well against the docstring as rejected, and as the greedy reply
    references = {r["source"]: r["messages"][-1]["content"] for rows in read_splits(project, "sft_dataset").values()
                  for r in rows}
    rows = ranked["validation"][:4]
    for row, reply in zip(rows, lora_greedy_replies(project, rows, settings["max_new_tokens"])):
        ref = references[row["source"]]
        chosen, rejected, plain = rouge_l_scores([row["chosen"], row["rejected"], reply], [ref] * 3)
        assert chosen >= rejected and chosen >= plain and row["chosen"] != row["rejected"]


def test_preference_dataset_on_policy_rejects_the_greedy_reply(post, tiny_config):
    project, instance, _ = post
    pm, settings = rebuild_preferences(post, tiny_config, "on_policy")
    splits = read_splits(project, "preference_dataset")
    generated = {s: [r for r in rows if r["negative"] == "on_policy"] for s, rows in splits.items()}
    assert 0 < len(generated["train"]) <= settings["max_train_pairs"]
    assert 0 < len(generated["validation"]) <= settings["max_validation_pairs"]
    assert pm["generated"] == len(generated["train"]) + len(generated["validation"]) + pm["on_policy_identical"]
    assert all(r["source"].startswith("stdlib/") and r["chosen"].strip() != r["rejected"] for rows in generated.values() for r in rows)
    # held-out prompts come from validation modules only, never from a module generated for in training
    module = lambda r: r["source"].split("::")[0]
    assert not {module(r) for r in generated["validation"]} & {module(r) for r in generated["train"]}
    assert 0 <= pm["rejected_repeats_share"] <= 1 and pm["generation_seconds"] > 0 and pm["mean_rejected_chars"] >= 0
    assert "lora_checkpoint" in pm["construction"] and "on_policy" in pm["samples"]
    # rejected is lora_checkpoint's greedy reply to that very prompt (fp32, the default: exact)
    rows = generated["validation"][:3]
    assert lora_greedy_replies(project, rows, settings["max_new_tokens"]) == [r["rejected"] for r in rows]


def test_lora_checkpoint_saves_adapter_and_merged_model(post):
    project, instance, result = post
    md = metadata(instance, "lora_checkpoint")
    out = project / "data/lake/lora_checkpoint"
    assert (out / "adapter/adapter_model.safetensors").is_file() and (out / "adapter/adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert model.config.vocab_size == len(tok)
    assert 0 < md["trainable_parameters"] < md["total_parameters"]
    assert 0 < md["trainable_share"] < 0.5
    assert md["eval_reply_loss_before"] > 0 and md["eval_reply_loss_after"] > 0
    assert md["loss_curve"].startswith("![")
    assert lock_md5(project, "lora_checkpoint") == md["dvc_md5"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["lora_improves_reply_loss"].passed == (md["eval_reply_loss_after"] < md["eval_reply_loss_before"])


def test_aligned_checkpoint_reports_preference_figures(post):
    project, instance, result = post
    md = metadata(instance, "aligned_checkpoint")
    out = project / "data/lake/aligned_checkpoint"
    AutoModelForCausalLM.from_pretrained(out / "merged")
    for name in ("base", "lora", "aligned"):
        assert 0 <= md[f"{name}_preference_accuracy"] <= 1
    assert md["accuracy_gain_over_lora"] == pytest.approx(md["aligned_preference_accuracy"] - md["lora_preference_accuracy"])
    for key in ("eval_reward_margin", "aligned_logp_chosen", "aligned_logp_rejected"):
        assert md[key] == md[key]  # a number, not NaN
    assert md["aligned_logp_chosen"] < 0 and md["aligned_logp_rejected"] < 0
    assert "| aligned |" in md["preference_accuracy"]
    assert lock_md5(project, "aligned_checkpoint") == md["dvc_md5"]
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "aligned_preference_accuracy")
    assert check.metadata["observed_accuracy"].value == md["method_accuracy"]


def test_preference_dataset_hard_negatives_and_a_bad_choice(post, tiny_config):
    project, instance, _ = post
    pm, _ = rebuild_preferences(post, tiny_config, "hard")
    rows = pq.read_table(project / "data/lake/preference_dataset/train.parquet").to_pylist()
    assert {r["negative"] for r in rows} <= {"module", "package", "any", ""} and "module" in pm["negatives"]
    assert pm["negatives_from"] == "hard" and "another definition" in pm["construction"] and "generated" not in pm
    cfg = tiny_config(["preference_dataset"])
    cfg["ops"]["preference_dataset"]["config"]["negatives"] = "random"
    failed = materialize(project, cfg, ["preference_dataset"], instance)
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "negatives: must be one of" in failure.step_failure_data.error.cause.message


@pytest.mark.parametrize("lines, message", [
    ([json.dumps({"instruction": "a", "output": "b"}), '{"instruction": "c", '], "{bad}:2: invalid JSON"),
    ([json.dumps({"instruction": "a", "output": "b"}), json.dumps({"instruction": "c"})],
     "{bad}: 1 of 2 records unusable (50.0% > max_bad_record_share 5.0%): missing_field 1 ({bad}:2: missing field 'output'"),
], ids=["malformed_json", "mostly_unusable"])
def test_malformed_user_file_fails_with_file_and_line_and_keeps_the_artifact(post, tiny_config, lines, message):
    project, instance, _ = post
    before = lock_md5(project, "sft_dataset")
    bad = project / "data/sft/broken.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    try:
        result = materialize(project, tiny_config(["sft_dataset"]), ["sft_dataset"], instance)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert message.format(bad=bad) in failure.step_failure_data.error.cause.message
        assert lock_md5(project, "sft_dataset") == before
        assert (project / "data/lake/sft_dataset/train.parquet").is_file()
    finally:
        bad.unlink()


def _hh_line(i: int, chosen: str, rejected: str, turns: int = 1, other_prompt: bool = False) -> str:
    """An HH-RLHF record: `turns` exchanges, then the final question the two replies answer."""
    history = "".join(f"\n\nHuman: Tell me about part {t} of machine {i}, please.\n\nAssistant: Part {t} of "
                      f"machine {i} turns the wheel that drives part {t + 1} of it." for t in range(turns - 1))
    prompt = history + f"\n\nHuman: Is machine {i} safe?\n\nAssistant:"
    other = f"\n\nHuman: Something else?\n\nAssistant:" if other_prompt else prompt
    return json.dumps({"chosen": prompt + chosen, "rejected": other + rejected})


def write_public_style_files(project: Path) -> tuple[Path, Path]:
    """Files as public datasets come: an HH-RLHF file with an empty reply, identical replies and
    dialogues that differ before the final reply (3 of 67 records, 4.5%) and 4 long dialogues (lines
    64-67); an Alpaca file with one record missing its output (1 of 31)."""
    hh = [_hh_line(i, f" Yes, machine {i} is safe.", " No.") for i in range(60)]
    hh += [_hh_line(60, "", " No."), _hh_line(61, " Same.", " Same. "), _hh_line(62, " Yes.", " No.", other_prompt=True)]
    hh += [_hh_line(63 + k, f" Yes, {k}.", f" No, {k}.", turns=14) for k in range(4)]
    alpaca = [{"instruction": f"Name tool {i}.", "input": "", "output": f"Tool {i} is a hammer."} for i in range(30)]
    alpaca.insert(11, {"instruction": "Name the last tool.", "input": ""})
    (project / "data/preferences/hh_public.jsonl").write_text("\n".join(hh) + "\n")
    (project / "data/sft/alpaca_public.json").write_text(json.dumps(alpaca, indent=1))
    return project / "data/preferences/hh_public.jsonl", project / "data/sft/alpaca_public.json"


def test_public_files_bad_records_are_counted_and_long_dialogues_truncated(post, tiny_config):
    project, instance, _ = post
    hh, alpaca = write_public_style_files(project)
    cfg = tiny_config(["sft_dataset", "preference_dataset", "aligned_checkpoint"])
    cfg["ops"]["preference_dataset"]["config"]["include_corpus"] = False  # user pairs only: every long pair is hh_public's
    try:
        assert materialize(project, cfg, ["sft_dataset", "preference_dataset", "aligned_checkpoint"], instance).success
        sm, pm, am = (metadata(instance, a) for a in ("sft_dataset", "preference_dataset", "aligned_checkpoint"))
        assert sm["dropped_bad_records"] == 1 and "| missing_field | 1 | alpaca_public.json:" in sm["bad_records"]
        assert sm["user_files"] == 4
        assert pm["dropped_bad_records"] == 4 and pm["dropped_identical"] == 2  # hh_public's 3 and trl.jsonl's identical
        for reason, where in [("empty_reply", "hh_public.jsonl:61"), ("identical_replies", "hh_public.jsonl:62"),
                              ("different_prefix", "hh_public.jsonl:63")]:
            assert reason in pm["bad_records"] and where in pm["bad_records"]
        assert pm["train_pairs"] + pm["validation_pairs"] == 20 + 8 + 64
        # the 4 long dialogues are truncated to max_len 128, not dropped, and named
        assert am["truncated_to_fit"] == 4 and am["dropped_too_long"] == 0
        assert am["too_long_examples"].startswith("truncated 4: hh_public.jsonl#L6")

        # above the share: the run fails naming file and counts, and the artifact stays as it was
        before = lock_md5(project, "preference_dataset")
        hh.write_text(hh.read_text() + "".join(_hh_line(70 + k, " Same.", " Same.") + "\n" for k in range(3)))
        failed = materialize(project, cfg, ["preference_dataset"], instance)
        cause = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error.cause
        assert f"{hh}: 6 of 70 records unusable (8.6% > max_bad_record_share 5.0%): identical_replies 4" in cause.message
        assert lock_md5(project, "preference_dataset") == before
    finally:
        hh.unlink()
        alpaca.unlink()


@pytest.mark.slow
def test_aligned_checkpoint_by_grpo_scored_by_rouge_and_the_reward_model(post, tiny_config):
    """objective grpo: online RL on sft_dataset's prompts, each sampled reply rewarded by ROUGE-L
    against its reference and by reward_model (trained first, on preference_dataset)."""
    project, instance, _ = post
    cfg = tiny_config(["reward_model", "aligned_checkpoint"])
    cfg["ops"]["aligned_checkpoint"]["config"].update(objective="grpo", batch_size=2, num_generations=4,
                                                      max_completion_length=8, reward_model_weight=0.5, log_every=1)
    assert materialize(project, cfg, ["reward_model", "aligned_checkpoint"], instance).success
    md = metadata(instance, "aligned_checkpoint")
    assert md["objective"] == "grpo" and md["steps_run"] == 4
    history = [json.loads(line) for line in (project / "data/lake/aligned_checkpoint/log_history.jsonl").open()]
    trained = [r for r in history if "rewards/reward_model/mean" in r]
    assert trained and all("rewards/rouge_reward/mean" in r for r in trained)  # both rewards scored every sample
    assert md["best_eval_loss"] == max(r["eval_reward"] for r in history if "eval_reward" in r)
    assert md["method_accuracy"] == md["aligned_preference_accuracy"]
    assert "| training prompts, held-out prompts |" in md["summary"]  # grpo trains on prompts, not pairs
    assert lock_md5(project, "aligned_checkpoint") == md["dvc_md5"]
