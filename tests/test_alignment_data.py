"""Alignment data tools: prompt taxonomy coverage and stratified sampling, response collection from two
checkpoints (resumable, with provenance, the same under torchrun), preference pairs, safety evaluation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from haina.core.errors import ConfigError
from haina.plugins.align.taxonomy import category_path, leaf_keywords, load_taxonomy
from haina.tools.align_data import task
from haina.tools.align_data.collect import collect, load_collect_config
from haina.tools.align_data.pairs import build_pairs, scores_from_labels
from haina.tools.align_data.prompts import (
    assign,
    coverage,
    distinct_2,
    format_coverage_report,
    stratified_sample,
)
from haina.tools.eval.safety import (
    ATTACKS,
    CATEGORIES,
    attack_prompts,
    evaluate_safety,
    format_safety_table,
    harmless_rates,
    make_judge,
    plot_safety,
)
from tests.alignment_helpers import haina, make_alignment_data
from tests.cli_helpers import cli_here
from tests.parallel_helpers import run_many

TOY = {
    "math": {"arithmetic": ["addition", {"name": "division", "description": "a / b", "keywords": ["divided"]}]},
    "chat": {"daily": [{"name": "greeting", "keywords": ["hello", "hi there"]}, "weather"]},
}


def _prompt(text: str, category: str | None = None) -> dict:
    item = {"prompt": [{"role": "user", "content": text}]}
    if category:
        item["category"] = category.split("/")
    return item


@pytest.fixture()
def toy_taxonomy(tmp_path: Path) -> Path:
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(TOY), encoding="utf-8")
    return path


def test_coverage_diversity_and_stratified_sampling(toy_taxonomy: Path) -> None:
    taxonomy = load_taxonomy(toy_taxonomy)
    assert taxonomy["math"]["arithmetic"] == ["addition", "division"]
    items = [_prompt(f"What is {i} + {i + 1}?", "math/arithmetic/addition") for i in range(8)]
    items += [_prompt("hello", "chat/daily/greeting")] * 3  # three copies: no diversity
    items += [_prompt("What is 8 divided by 2?", "math/arithmetic/division"), _prompt("?", "nope/x")]
    report = coverage(items, taxonomy, min_count=2)
    top, middle, leaf = report["levels"]
    assert report["unknown_category"] == 1
    assert top["rows"]["math"]["count"] == 9 and top["rows"]["math"]["share"] == pytest.approx(9 / 12)
    assert middle["covered"] == 2 and leaf["covered"] == 3 and leaf["categories"] == 4
    assert set(leaf["below_minimum"]) == {"math/arithmetic/division", "chat/daily/weather"}
    diversity = report["diversity"]
    assert diversity["chat/daily/greeting"]["embedding_spread"] == pytest.approx(0.0, abs=1e-6)
    assert diversity["math/arithmetic/addition"]["embedding_spread"] > 0.05
    assert diversity["math/arithmetic/addition"]["distinct_2"] > distinct_2(["hello world"] * 3)
    assert "chat/daily/greeting" in format_coverage_report(report)

    # Four picks from a pool of 8 / 3 / 1 (and one unknown): one from each, then the tie goes by name.
    picked = stratified_sample(items, 4, 0, taxonomy)
    counts = Counter("/".join(category_path(it)) for it in picked)
    assert counts == {"chat/daily/greeting": 2, "math/arithmetic/addition": 1, "math/arithmetic/division": 1}
    # Already holding two greetings, the next three go to the others first.
    picked = stratified_sample(items, 3, 1, taxonomy, already=Counter({"chat/daily/greeting": 2}))
    assert Counter("/".join(category_path(it)) for it in picked) == {
        "math/arithmetic/addition": 2, "math/arithmetic/division": 1}
    assert len(stratified_sample(items, 100, 0, taxonomy)) == len(items)  # the pool runs dry, unknowns last


def test_assignment_by_rules_and_classifier(toy_taxonomy: Path) -> None:
    taxonomy = load_taxonomy(toy_taxonomy)
    assert leaf_keywords(toy_taxonomy)["chat/daily/greeting"] == ["hello", "hi there"]
    items = [_prompt("hello, how are you"), _prompt("What is 6 divided by 3"), _prompt("unrelated words")]
    assign(items, taxonomy, "rules", leaf_keywords(toy_taxonomy))
    assert [it.get("category") for it in items] == [["chat", "daily", "greeting"], ["math", "arithmetic", "division"], None]
    labelled = [_prompt(f"What is {i} + {i}?", "math/arithmetic/addition") for i in range(20)]
    labelled += [_prompt(f"Is it sunny or rainy in city {i}?", "chat/daily/weather") for i in range(20)]
    fresh = [_prompt("What is 30 + 4?"), _prompt("Will it be rainy in city 99 tomorrow?")]
    assign(fresh, taxonomy, "classifier", {}, labelled)
    assert [it["category"] for it in fresh] == [["math", "arithmetic", "addition"], ["chat", "daily", "weather"]]


def test_pairs_keep_the_gap_and_the_provenance(tmp_path: Path) -> None:
    prompt = task.make_prompts(1, 0)[0]
    base = {"prompt": prompt["prompt"], "prompt_id": prompt["id"], "answer": prompt["answer"], "category": prompt["category"]}
    replies = [("a", prompt["answer"], "big"), ("b", f"it is {prompt['answer']}", "small"), ("c", "zzz", "small"),
               ("d", "zzz", "big"), ("e", "qqq", "big"), ("f", "  ", "small")]
    records = [{**base, "id": rid, "response": text, "model": model, "setting": "greedy", "step": 3}
               for rid, text, model in replies]
    scores = {r["id"]: task.reward(prompt, r["response"]) for r in records}  # 1, 0.5, 0, 0, 0
    pairs = build_pairs(records, scores)
    got = {(p["chosen"], p["rejected"]): p["gap"] for p in pairs}
    # "zzz" twice counts once; equal scores (zzz vs qqq) make no pair; the empty reply makes none.
    assert got == {(prompt["answer"], f"it is {prompt['answer']}"): 0.5, (prompt["answer"], "zzz"): 1.0,
                   (prompt["answer"], "qqq"): 1.0, (f"it is {prompt['answer']}", "zzz"): 0.5,
                   (f"it is {prompt['answer']}", "qqq"): 0.5}
    for p in pairs:
        assert p["gap"] == pytest.approx(p["chosen_score"] - p["rejected_score"])
        assert p["category"] == prompt["category"] and p["chosen_from"]["step"] == 3
    assert pairs[0]["gap"] == 1.0  # widest first
    assert {(p["chosen"], p["rejected"]) for p in build_pairs(records, scores, min_gap=0.75)} == {
        (prompt["answer"], "zzz"), (prompt["answer"], "qqq")}
    assert len(build_pairs(records, scores, max_pairs_per_prompt=2)) == 2
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(x) for x in ({"id": "a", "rank": 1}, {"id": "c", "rank": 3})))
    ranked = build_pairs(records, scores_from_labels(labels))
    assert [(p["chosen"], p["rejected"], p["gap"]) for p in ranked] == [(prompt["answer"], "zzz", 2.0)]


def test_safety_rates_on_a_planted_set(tmp_path: Path) -> None:
    items = attack_prompts("eval")
    assert len(items) == len(CATEGORIES) * 2 * len(ATTACKS) * 2
    assert not {it["prompt"][0]["content"] for it in items} & {it["prompt"][0]["content"] for it in attack_prompts("train")}
    # Planted replies: violence refused 3 times in 4, everything else refused, one hacking reply complies.
    replies = []
    seen: Counter[str] = Counter()
    for it in items:
        category = it["category"][-1]
        seen[category] += 1
        if category == "violence" and seen[category] % 4 == 0:
            replies.append("Here is how: punch first.")
        elif category == "hacking" and seen[category] == 1:
            replies.append("Step 1: guess the password.")
        else:
            replies.append("抱歉，我不能帮助做这件事。" if it["language"] == "zh" else "I can't help with that.")
    rates = harmless_rates(items, make_judge("refusal")(items, replies))
    assert rates["by_category"]["violence"]["harmless"] == pytest.approx(0.75)
    n = rates["by_category"]["hacking"]["prompts"]
    assert rates["by_category"]["hacking"]["harmless"] == pytest.approx((n - 1) / n)
    assert rates["by_category"]["fraud"]["harmless"] == 1.0
    assert rates["overall"]["harmless"] == pytest.approx(1 - (len(items) // 8 // 4 + 1) / len(items))
    assert sum(r["prompts"] for r in rates["by_attack"].values()) == len(items)
    words = make_judge("words")(items, replies)
    assert words == make_judge("refusal")(items, replies)  # the complying replies name unsafe terms
    with pytest.raises(ConfigError, match="use refusal, words"):
        make_judge("magic")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("collect")
    data = make_alignment_data(root / "data")
    common = ["--config", "tiny", f"data.prefixes=[{data.pretrain_prefix}]", f"data.tokenizer={data.tokenizer}",
              "train.save_every=100"]
    run_many([{"name": name, "overrides": [*common[2:], f"train.run_dir={root / name}", f"train.steps={steps}"]}
              for name, steps in (("small", 2), ("longer", 4))], 1)  # the tiny preset, two runs in one process
    prompts = task.write_jsonl(task.make_prompts(10, 7), root / "prompts.jsonl")
    return root / "small", root / "longer", prompts


def _collect_config(folder: Path, small: Path, longer: Path, prompts: Path) -> Path:
    config = {
        "prompts": str(prompts), "out": str(folder / "responses.jsonl"), "batch_size": 4,
        "models": [{"name": "small", "checkpoint": str(small)}, {"name": "longer", "checkpoint": str(longer)}],
        "settings": [{"name": "greedy", "temperature": 0, "max_new_tokens": 4},
                     {"name": "hot", "temperature": 1.0, "top_k": 20, "max_new_tokens": 4, "samples": 2}],
    }
    path = folder / "collect.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_collection_is_resumable_records_provenance_and_runs_under_torchrun(
    two_checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small, longer, prompts = two_checkpoints
    config = _collect_config(tmp_path, small, longer, prompts)
    cfg = load_collect_config(config)
    first = collect(cfg, progress=False)
    out = Path(cfg.out)
    full = _lines(out)
    assert first["new"] == first["records"] == len(full) == 10 * 2 * (1 + 2)
    by_id = {r["id"]: r for r in full}
    assert len(by_id) == len(full)
    record = by_id[f"{task.make_prompts(10, 7)[0]['id']}|longer|hot|1"]
    assert record["model"] == "longer" and record["step"] == 4 and record["setting"] == "hot"
    assert record["sampling"]["temperature"] == 1.0 and record["sample"] == 1 and "answer" in record
    assert by_id[record["id"].replace("longer|hot|1", "small|greedy|0")]["step"] == 2

    # Killed mid-run: the merged file lost its tail and a part file holds some records and a torn line.
    out.write_text("".join(json.dumps(r) + "\n" for r in full[:25]), encoding="utf-8")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "rank-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[25:31]) + '{"id": "torn', encoding="utf-8")
    again = collect(cfg, progress=False)
    assert again["new"] == len(full) - 31 and again["records"] == len(full)
    resumed = _lines(out)
    assert [r["id"] for r in resumed] == [r["id"] for r in full] and not parts.exists()
    greedy = {r["id"]: r["response"] for r in full if r["setting"] == "greedy"}
    assert {r["id"]: r["response"] for r in resumed if r["setting"] == "greedy"} == greedy

    # Two data-parallel workers: the same records, greedy replies identical.
    folder = tmp_path / "dp"
    folder.mkdir()
    haina("rm-collect", "--config", str(_collect_config(folder, small, longer, prompts)), nproc=2)
    dp = _lines(folder / "responses.jsonl")
    assert [r["id"] for r in dp] == [r["id"] for r in full]
    assert {r["id"]: r["response"] for r in dp if r["setting"] == "greedy"} == greedy

    # The pairs command on the collection, scored by the task's verifier.
    code, _, err = cli_here(capsys, "rm", "pairs", "--responses", str(out), "--out", str(tmp_path / "pairs.jsonl"),
                            "--verifier", "haina.tools.align_data.task:reward")
    assert code == 0, err
    for pair in _lines(tmp_path / "pairs.jsonl"):
        assert pair["gap"] > 0 and pair["chosen_from"]["model"] in ("small", "longer")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_safety_evaluation_before_and_after(two_checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small, longer, _ = two_checkpoints
    items = attack_prompts("eval")[:24]
    report = evaluate_safety({"before": (str(small), ""), "after": (str(longer), "")}, items, "words", max_new_tokens=3)
    for label in ("before", "after"):
        rates = report["models"][label]
        assert rates["overall"]["prompts"] == 24 and len(rates["responses"]) == 24
        harmless = [r["harmless"] for r in rates["responses"]]
        assert rates["overall"]["harmless"] == pytest.approx(sum(harmless) / 24)
    table = format_safety_table(report)
    assert "before" in table and "after" in table and "overall" in table
    assert plot_safety(report, tmp_path / "safety.png").stat().st_size > 1000
    code, _, err = cli_here(capsys, "eval", "safety", "--checkpoint", str(longer), "--compare", str(small),
                            "--out", str(tmp_path / "cli"), "--max-new-tokens", "2")
    assert code == 0, err
    written = json.loads((tmp_path / "cli" / "safety.json").read_text())
    assert set(written["models"]) == {"before", "after"} and (tmp_path / "cli" / "safety.png").is_file()


PROVENANCE = ("prompt_id", "response", "model", "checkpoint", "prefix", "step", "setting", "sampling", "sample",
              "finished", "answer", "category")


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_collection_under_tensor_parallelism_repeats_one_process(two_checkpoints, tmp_path: Path) -> None:
    """`haina rm collect --config collect.yaml --nproc-per-node 2 parallel.tp=2` (the README's form): each
    model sharded over two ranks gives the one-process collection's records, sampled ones included (the
    same seeds), with their provenance."""
    small, longer, prompts = two_checkpoints
    single = tmp_path / "single"
    single.mkdir()
    cfg = load_collect_config(_collect_config(single, small, longer, prompts))
    collect(cfg, progress=False)
    expected = _lines(Path(cfg.out))

    folder = tmp_path / "tp2"
    folder.mkdir()
    config = _collect_config(folder, small, longer, prompts)
    proc = haina("rm", "collect", "--config", str(config), "--nproc-per-node", "2", "parallel.tp=2")
    assert f"60 in {folder / 'responses.jsonl'}" in proc.stdout
    got = _lines(folder / "responses.jsonl")
    assert not (folder / "responses.jsonl.parts").exists()
    assert [r["id"] for r in got] == [r["id"] for r in expected] and len(got) == 10 * 2 * (1 + 2)
    assert [r["response"] for r in got] == [r["response"] for r in expected]
    assert any(r["response"] for r in got)
    source = {p["id"]: p for p in task.make_prompts(10, 7)}
    steps, paths = {"small": 2, "longer": 4}, {"small": str(small), "longer": str(longer)}
    settings = {"greedy": {"temperature": 0, "max_new_tokens": 4}, "hot": {"temperature": 1.0, "top_k": 20, "max_new_tokens": 4}}
    for ours, theirs in zip(got, expected, strict=True):
        assert {k: ours[k] for k in PROVENANCE} == {k: theirs[k] for k in PROVENANCE}, ours["id"]
        prompt_id, model, setting, sample = ours["id"].split("|")
        assert ours["prompt_id"] == prompt_id and ours["answer"] == source[prompt_id]["answer"]
        assert ours["model"] == model and ours["checkpoint"] == paths[model] and ours["step"] == steps[model]
        assert ours["prefix"] == "" and ours["setting"] == setting and ours["sample"] == int(sample)
        assert {k: ours["sampling"][k] for k in settings[setting]} == settings[setting]
        assert isinstance(ours["finished"], bool)
