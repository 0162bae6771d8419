"""Prompt files: every supported format, the real benchmark files, and malformed files."""
import json
from pathlib import Path

import pytest

from dmdr.prompts import PromptFileError, load_prompts, load_records, world_prompt_sets, held_out
from dmdr.world import grammar

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    p.write_bytes(content) if mode == "wb" else p.write_text(content)
    return p


def test_plain_text_skips_blank_lines(tmp_path):
    assert load_prompts(write(tmp_path, "p.txt", "a cat\n\n  a dog  \n")) == ["a cat", "a dog"]


def test_jsonl_json_csv_tsv(tmp_path):
    assert load_prompts(write(tmp_path, "p.jsonl", '{"prompt": "one"}\n{"text": "two"}\n"three"\n')) == ["one", "two", "three"]
    assert load_prompts(write(tmp_path, "p.json", json.dumps([{"caption": "a"}, "b"]))) == ["a", "b"]
    assert load_prompts(write(tmp_path, "p.csv", 'id,text\n1,"a, quoted"\n2,b\n')) == ["a, quoted", "b"]
    assert load_prompts(write(tmp_path, "p.tsv", "prompt\tscore\nx\t1\ny\t2\n")) == ["x", "y"]


def test_geneval_metadata_keeps_tags_and_clauses(tmp_path):
    line = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
    (r,) = load_records(write(tmp_path, "evaluation_metadata.jsonl", json.dumps(line) + "\n"))
    assert r["tag"] == "counting" and r["include"] == line["include"] and r["exclude"] == line["exclude"]


def test_dpg_csv_groups_questions_by_item(tmp_path):
    p = tmp_path / "dpg.csv"
    specs = [grammar.read("a picture of a large red circle left of a small blue square")]
    from dmdr.prompts import write_dpg_csv
    write_dpg_csv(specs, p)
    (r,) = load_records(p)
    assert r["prompt"] == grammar.text(specs[0])
    assert [q["tuple"] for q in r["questions"]] == [q["tuple"] for q in grammar.questions(specs[0])]
    assert r["questions"][-1]["dependency"] == [1, 4]


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "\n\n", "no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', r"bad.jsonl:2: malformed JSON"),
    ("nokey.jsonl", '{"prompt": "ok"}\n{"label": 3}\n', r"nokey.jsonl:2: record has none of the columns"),
    ("blank.jsonl", '{"prompt": "  "}\n', r"blank.jsonl:1: empty"),
    ("nocol.csv", "id,label\n1,x\n", r"nocol.csv:1: header has none of the columns"),
    ("ragged.csv", "prompt\na,b,c\n", r"ragged.csv:2: more fields"),
    ("obj.json", '{"prompt": "x"}', r"obj.json:1: expected a JSON list"),
    ("dpg.csv", "item_id,text,question_natural_language\n1,x,Is it?\n", r"dpg.csv:1: DPG-Bench csv lacks columns"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, content, match):
    with pytest.raises(PromptFileError, match=match):
        load_prompts(write(tmp_path, name, content))


def test_non_utf8_names_the_line(tmp_path):
    with pytest.raises(PromptFileError, match=r"latin.txt:2: not UTF-8"):
        load_prompts(write(tmp_path, "latin.txt", b"fine\ncaf\xe9\n", mode="wb"))


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "nope.txt")


@pytest.mark.skipif(not BENCH.exists(), reason="../shared/data/benchmarks not present")
@pytest.mark.parametrize("rel, n", [("geneval/evaluation_metadata.jsonl", 553), ("dpg_bench/prompts.jsonl", 1065),
                                    ("dsg1k/dsg-1k-anns.csv", 1060), ("imagereward/benchmark-prompts.json", 100),
                                    ("imagereward/refl_data.json", 10000)])
def test_real_benchmark_files(rel, n):
    records = load_records(BENCH / rel)
    assert len(records) == n
    if rel.startswith("geneval"):
        assert {r["tag"] for r in records} == set(grammar.GENEVAL_TAGS)
        assert records[-1]["include"][0]["color"] == "blue"
    if rel.startswith("dsg"):
        assert sum(len(r["questions"]) for r in records) == 8182


def test_world_splits_are_disjoint_and_test_holds_unseen_combinations():
    train, test = world_prompt_sets(0, 500, 6, 20)
    train_texts = {grammar.text(s) for s in train}
    assert not train_texts & {grammar.text(s) for s in test}
    assert not any(held_out(s) for s in train)
    assert all(held_out(s) for s in test if s.tag in ("colors", "color_attr", "position", "dense"))
    assert {s.tag for s in test} == set(grammar.GENEVAL_TAGS) | {"dense"}
