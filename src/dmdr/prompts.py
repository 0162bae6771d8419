"""Prompt files: the world's prompt sets, and real prompt files of every common format.

`load_prompts(path)` reads plain text (one prompt a line), JSONL, a JSON list, CSV or TSV with a prompt/text/caption
column, GenEval's evaluation_metadata.jsonl and DPG-Bench's question csv, and returns the prompts in file order
(unique prompts for the question-per-row DPG format). `load_records` keeps the rest of each record (GenEval tags and
include clauses, DPG questions) for the scorers. Errors name the file and line.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .world import grammar

PROMPT_KEYS = ("prompt", "text", "caption")
DPG_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
               "tuple", "question_natural_language")


class PromptFileError(ValueError):
    pass


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _prompt_of(record, path: Path, line: int) -> str:
    if isinstance(record, str):
        p = record
    elif isinstance(record, dict):
        key = next((k for k in PROMPT_KEYS if k in record), None)
        if key is None:
            raise PromptFileError(f"{path}:{line}: record has none of the columns {PROMPT_KEYS}: {sorted(record)}")
        p = record[key]
    else:
        raise PromptFileError(f"{path}:{line}: expected a string or an object, got {type(record).__name__}")
    if not isinstance(p, str) or not p.strip():
        raise PromptFileError(f"{path}:{line}: empty or non-string prompt")
    return p.strip()


def load_records(path: str | Path) -> list[dict]:
    """Every record of a prompt file as a dict with at least 'prompt' (and 'line', its 1-based line).

    GenEval metadata keeps 'tag', 'include', 'exclude'; DPG-Bench csv gives one record per prompt with its
    'questions' (proposition_id, dependency list, category_broad, tuple, question_natural_language).
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    records: list[dict] = []
    if suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            rec = dict(obj) if isinstance(obj, dict) else {}
            rec.update(prompt=_prompt_of(obj, path, i), line=i)
            records.append(rec)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path}:1: expected a JSON list of prompts or objects")
        for i, obj in enumerate(data):
            rec = dict(obj) if isinstance(obj, dict) else {}
            rec.update(prompt=_prompt_of(obj, path, f"item {i}"), line=i + 1)
            records.append(rec)
    elif suffix in (".csv", ".tsv"):
        records = _read_table(text, path, "\t" if suffix == ".tsv" else ",")
    else:  # plain text, one prompt a line
        records = [{"prompt": line.strip(), "line": i} for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not records:
        raise PromptFileError(f"{path}: no prompts in file")
    return records


def _read_table(text: str, path: Path, delimiter: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    cols = reader.fieldnames or []
    if "question_natural_language" in cols:  # DPG-Bench: one row per question, grouped by item_id
        missing = [c for c in ("item_id", "text", "proposition_id", "dependency", "tuple") if c not in cols]
        if missing:
            raise PromptFileError(f"{path}:1: DPG-Bench csv lacks columns {missing}")
        items: dict[str, dict] = {}
        for row in reader:
            i = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise PromptFileError(f"{path}:{i}: wrong number of fields")
            try:
                q = {"proposition_id": int(row["proposition_id"]),
                     # the published DSG-1k file has stray words among the parent ids ("5, right"): ids only
                     "dependency": [int(d) for d in row["dependency"].split(",") if d.strip().isdigit()] or [0],
                     "category_broad": row.get("category_broad", ""), "tuple": row["tuple"],
                     "question_natural_language": row["question_natural_language"]}
            except ValueError as e:
                raise PromptFileError(f"{path}:{i}: bad proposition_id or dependency ({e})") from None
            rec = items.setdefault(row["item_id"], {"item_id": row["item_id"], "prompt": _prompt_of(row, path, i),
                                                    "line": i, "questions": []})
            rec["questions"].append(q)
        return list(items.values())
    key = next((k for k in PROMPT_KEYS if k in cols), None)
    if key is None:
        raise PromptFileError(f"{path}:1: header has none of the columns {PROMPT_KEYS}: {cols}")
    out = []
    for row in reader:
        if None in row:
            raise PromptFileError(f"{path}:{reader.line_num}: more fields than the header")
        rec = {k: v for k, v in row.items()}
        rec.update(prompt=_prompt_of(row, path, reader.line_num), line=reader.line_num)
        out.append(rec)
    return out


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of any supported prompt file, in file order."""
    return [r["prompt"] for r in load_records(path)]


# --- the embedded world's prompt sets -------------------------------------------------------------------------


def held_out(spec: grammar.Spec) -> bool:
    """Combinations kept out of training prompts: a third of the colour-shape bindings and of the
    (shape, relation, shape) triples, chosen by a fixed rule so every split agrees."""
    from .world.scene import COLORS, RELATIONS, SHAPES
    colors, shapes = list(COLORS), list(SHAPES)
    for g in spec.groups:
        if g.color and (colors.index(g.color) + shapes.index(g.shape)) % 3 == 0:
            return True
    if spec.relation:
        a, b = spec.groups[0].shape, spec.groups[1].shape
        if (shapes.index(a) + 2 * shapes.index(b) + RELATIONS.index(spec.relation)) % 3 == 0:
            return True
    return False


def world_prompt_sets(seed: int, n_train: int, test_per_tag: int, n_test_dense: int):
    """Disjoint train and test prompt sets of the embedded world.

    Test: for each GenEval tag `test_per_tag` prompts (cycling through the tag's prompts when it has fewer; tags with
    colours or relations use held-out combinations only) and `n_test_dense` dense prompts with a held-out
    combination. Train: prompts of every template with no held-out combination and no test prompt's text.
    Returns (train specs, test specs).
    """
    rng = np.random.default_rng(seed)
    test: list[grammar.Spec] = []
    for tag in grammar.GENEVAL_TAGS:
        pool = {}
        for _ in range(4000):
            s = grammar.sample_spec(rng, tag)
            if tag in ("colors", "color_attr", "position") and not held_out(s):
                continue
            pool[grammar.text(s)] = s
        unique = [pool[k] for k in sorted(pool)]
        order = rng.permutation(len(unique))
        test += [unique[order[i % len(unique)]] for i in range(test_per_tag)]
    dense = []
    while len(dense) < n_test_dense:
        s = grammar.sample_spec(rng, "dense")
        if held_out(s):
            dense.append(s)
    test += dense
    test_texts = {grammar.text(s) for s in test}
    train: dict[str, grammar.Spec] = {}
    tags = grammar.GENEVAL_TAGS + ("dense", "dense", "dense")
    for _ in range(100 * n_train):
        if len(train) >= n_train:
            break
        s = grammar.sample_spec(rng, tags[int(rng.integers(len(tags)))])
        t = grammar.text(s)
        if not held_out(s) and t not in test_texts:
            train[t] = s
    return list(train.values()), test


def write_geneval_metadata(specs, path: Path) -> None:
    """GenEval tag prompts in GenEval's evaluation_metadata.jsonl format."""
    with open(path, "w") as f:
        for s in specs:
            include, exclude = grammar.geneval_clauses(s)
            rec = {"tag": s.tag, "include": include} | ({"exclude": exclude} if exclude else {})
            f.write(json.dumps(rec | {"prompt": grammar.text(s)}) + "\n")


def write_dpg_csv(specs, path: Path) -> None:
    """Prompts with their question lists in DPG-Bench's csv format (one row per question)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DPG_COLUMNS)
        for i, s in enumerate(specs):
            for q in grammar.questions(s):
                w.writerow([f"world_{i}", grammar.text(s), q["tuple"].split("(")[1].rstrip(")"), q["proposition_id"],
                            ",".join(map(str, q["dependency"])), q["category_broad"], q["tuple"].split(" - ")[1].split(" ")[0],
                            q["tuple"], q["question_natural_language"]])


def build_prompt_sets(p, out: Path) -> dict:
    """The `prompts` stage: the world's disjoint train / test sets in real benchmark formats (train.txt, GenEval
    metadata for the tag prompts, DPG-Bench csv for the dense prompts), plus every real file named in
    `prompts.extra_files` read through `load_prompts` and written one prompt a line. Returns counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = world_prompt_sets(p.seed, p.prompts.n_train, p.prompts.test_per_tag, p.prompts.n_test_dense)
    (out / "train.txt").write_text("".join(grammar.text(s) + "\n" for s in train))
    write_geneval_metadata([s for s in test if s.tag != "dense"], out / "test_geneval.jsonl")
    write_dpg_csv([s for s in test if s.tag == "dense"], out / "test_dpg.csv")
    counts = {"train": len(train), "test_geneval": sum(s.tag != "dense" for s in test),
              "test_dpg": sum(s.tag == "dense" for s in test),
              "train_test_overlap": len({grammar.text(s) for s in train} & {grammar.text(s) for s in test})}
    for f in p.prompts.extra_files:
        texts = load_prompts(f)
        (out / f"extra_{Path(f).stem}.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
        counts[f"extra_{Path(f).stem}"] = len(texts)
    return counts


def test_specs(prompt_dir: Path, per_tag: int | None = None) -> list[grammar.Spec]:
    """The GenEval-tag test prompts of the world as specs, optionally the first `per_tag` of each tag."""
    specs, seen = [], {}
    for r in load_records(Path(prompt_dir) / "test_geneval.jsonl"):
        if per_tag is None or seen.get(r["tag"], 0) < per_tag:
            seen[r["tag"]] = seen.get(r["tag"], 0) + 1
            specs.append(grammar.Spec(grammar.read(r["prompt"]).groups, grammar.read(r["prompt"]).relation, r["tag"]))
    return specs
