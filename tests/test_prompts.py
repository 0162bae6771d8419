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


def test_published_headers_in_any_case(tmp_path):
    """PartiPrompts' TSV ('Prompt') and DrawBench's CSV ('Prompts'), as published; a JSONL 'Prompt' field too."""
    parti = "Prompt\tCategory\tChallenge\tNote\nA red apple\tFood\tBasic\t\n\"Hello\" on a sign\tText\tWriting\t\n"
    assert load_prompts(write(tmp_path, "PartiPrompts.tsv", parti)) == ["A red apple", '"Hello" on a sign']
    drawbench = 'Prompts,Category\nA blue colored dog.,Colors\n"A cat, sitting",Misc\n'
    assert load_prompts(write(tmp_path, "drawbench.csv", drawbench)) == ["A blue colored dog.", "A cat, sitting"]
    assert load_prompts(write(tmp_path, "p.jsonl", '{"Prompt": "one"}\n')) == ["one"]


def test_when_several_columns_fit_the_choice_is_said(tmp_path):
    with pytest.warns(UserWarning, match=r"columns \['prompt', 'text'\] could each hold the prompt; reading 'prompt'"):
        assert load_prompts(write(tmp_path, "p.csv", "text,prompt\nfirst,second\n")) == ["second"]


def test_tsv_is_read_without_quoting(tmp_path):
    """A tab ends every field and a quote is text: a leading quote stays, an unbalanced one merges nothing."""
    p = write(tmp_path, "p.tsv", 'prompt\n"quoted" start\n"unbalanced\nnext prompt\n')
    assert load_prompts(p) == ['"quoted" start', '"unbalanced', "next prompt"]


def test_a_quoted_csv_field_may_hold_a_newline_and_later_lines_are_still_named(tmp_path):
    p = write(tmp_path, "p.csv", 'prompt\n"two\nlines"\nok\n""\n')
    with pytest.raises(PromptFileError, match=r"p.csv:5: empty or non-string prompt"):
        load_prompts(p)
    assert load_prompts(write(tmp_path, "q.csv", 'prompt\n"two\nlines"\nok\n')) == ["two\nlines", "ok"]


def test_memory_is_in_proportion_to_the_prompts_kept(tmp_path):
    """A 20 MB table whose prompts are 2% of it: reading its prompts must not hold the file (the old reader held
    8-12 times its size: bytes, decoded text, a copy, every record)."""
    import tracemalloc
    row = "a photo of a cat {}," + "x" * 1000 + "\n"
    p = tmp_path / "big.csv"
    with open(p, "w") as f:
        f.write("prompt,notes\n")
        for i in range(20000):
            f.write(row.format(i))
    tracemalloc.start()
    prompts = load_prompts(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(prompts) == 20000 and peak < 0.25 * p.stat().st_size, (peak, p.stat().st_size)


# Malformed prompt files: (file name, content, the error it must give, as a regex)
MALFORMED = [
    ("empty.txt", "\n\n", "no prompts"),
    ("blank_lines.jsonl", "\n  \n", "no prompts"),
    ("header_only.csv", "prompt,category\n", "no prompts"),
    ("list_line.jsonl", '{"prompt": "ok"}\n[1, 2]\n', r"list_line.jsonl:2: expected a string or an object, got list"),
    ("number.json", '["ok", 3]', r"number.json:item 1: expected a string or an object, got int"),
    ("unclosed.csv", 'prompt\nok\n"never closed\nnext\n', r"unclosed.csv:3: unexpected end of data \(a quote opened"),
    ("stray_quote.csv", 'prompt\n"a"b\n', r"stray_quote.csv:2: ',' expected after"),
    ("short_row.csv", "id,prompt\n1,a\n2\n", r"short_row.csv:3: no 'prompt' field"),
    ("dpg_ragged.csv", "item_id,text,proposition_id,dependency,tuple,question_natural_language\n1,x,1,0,t\n",
     r"dpg_ragged.csv:2: wrong number of fields \(5, the header has 6\)"),
    ("dpg_ids.csv", "item_id,text,proposition_id,dependency,tuple,question_natural_language\n1,x,one,0,t,q\n",
     r"dpg_ids.csv:2: bad proposition_id"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', r"bad.jsonl:2: malformed JSON"),
    ("nokey.jsonl", '{"prompt": "ok"}\n{"label": 3}\n', r"nokey.jsonl:2: record has none of the columns"),
    ("blank.jsonl", '{"prompt": "  "}\n', r"blank.jsonl:1: empty"),
    ("nocol.csv", "id,label\n1,x\n", r"nocol.csv:1: header has none of the columns"),
    ("ragged.csv", "prompt\na,b,c\n", r"ragged.csv:2: more fields"),
    ("obj.json", '{"prompt": "x"}', r"obj.json:1: expected a JSON list"),
    ("dpg.csv", "item_id,text,question_natural_language\n1,x,Is it?\n", r"dpg.csv:1: DPG-Bench csv lacks columns"),
]


@pytest.mark.parametrize("name, content, match", MALFORMED)
def test_malformed_files_name_file_and_line(tmp_path, name, content, match):
    with pytest.raises(PromptFileError, match=match):
        load_prompts(write(tmp_path, name, content))


def test_non_utf8_names_the_line(tmp_path):
    with pytest.raises(PromptFileError, match=r"latin.txt:2: not UTF-8"):
        load_prompts(write(tmp_path, "latin.txt", b"fine\ncaf\xe9\n", mode="wb"))
    with pytest.raises(PromptFileError, match=r"latin.csv:3: not UTF-8"):
        load_prompts(write(tmp_path, "latin.csv", b"prompt\nfine\ncaf\xe9\n", mode="wb"))
    with pytest.raises(PromptFileError, match=r"image.png:1: not UTF-8"):
        load_prompts(write(tmp_path, "image.png", b"\x89PNG\r\n\x1a\n\x00\x00", mode="wb"))
    assert load_prompts(write(tmp_path, "bom.csv", "\ufeffprompt\nfine\n".encode(), mode="wb")) == ["fine"]


def test_a_directory_or_a_huge_field_is_an_error_naming_the_place(tmp_path):
    with pytest.raises(PromptFileError, match=rf"{tmp_path}: is a directory, not a prompt file"):
        load_prompts(tmp_path)
    big = write(tmp_path, "big.csv", 'prompt\nok\n"' + "x" * 200_000 + '"\n')
    with pytest.raises(PromptFileError, match=r"big.csv:3: field larger than field limit"):
        load_prompts(big)


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


def test_ellas_dpg_bench_directory_is_read_as_published(tmp_path):
    """ELLA's dpg_bench/: dpg_bench.csv with the questions, prompts/<item_id>.txt with the prompts (in numeric order
    when there is no csv); a directory with neither is an error naming it."""
    from dmdr.prompts import write_dpg_csv
    bench = tmp_path / "dpg_bench"
    (bench / "prompts").mkdir(parents=True)
    specs = [grammar.read(t) for t in ("a picture of a large red circle", "a picture of two blue squares")]
    write_dpg_csv(specs, bench / "dpg_bench.csv")
    for i, spec in enumerate(specs):
        (bench / "prompts" / f"world_{i}.txt").write_text(grammar.text(spec) + ", in a photo\n")
    records = load_records(bench)
    assert [r["prompt"] for r in records] == [grammar.text(s) + ", in a photo" for s in specs]
    assert [len(r["questions"]) for r in records] == [3, 3]
    (bench / "dpg_bench.csv").unlink()
    for n in (2, 10, 1):
        (bench / "prompts" / f"{n}.txt").write_text(f"prompt {n}\n")
    assert load_prompts(bench)[:3] == ["prompt 1", "prompt 2", "prompt 10"]
    with pytest.raises(PromptFileError, match=rf"{tmp_path}: is a directory, not a prompt file \(a DPG-Bench"):
        load_prompts(tmp_path)
