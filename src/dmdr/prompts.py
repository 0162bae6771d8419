"""Prompt files: the world's prompt sets, and real prompt files of every common format.

`load_prompts(path)` reads plain text (one prompt a line), JSONL, a JSON list, CSV or TSV with a prompt, prompts,
text or caption column (any case), GenEval's evaluation_metadata.jsonl and DPG-Bench's question csv, and returns the
prompts in file order (unique prompts for the question-per-row DPG format). `load_records` keeps the rest of each
record (GenEval tags and include clauses, DPG questions) for the scorers. Files are read a line at a time. Errors
name the file and line.
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from .world import grammar

PROMPT_KEYS = ("prompt", "prompts", "text", "caption")  # matched in any case: PartiPrompts' "Prompt", DrawBench's "Prompts"
DPG_COLUMNS = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
               "tuple", "question_natural_language")


class PromptFileError(ValueError):
    pass


def _lines(path: Path):
    """(line number, text) of each line, read and decoded one line at a time (memory in proportion to a line);
    a byte that is not UTF-8 is an error naming its line; a leading byte-order mark is dropped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    with f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{path}:{i}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            yield i, line.removeprefix("\ufeff") if i == 1 else line


def _prompt_key(keys, path: Path, line) -> str | None:
    """The column or field that holds the prompt: the first of PROMPT_KEYS, in any case; when several fit, the
    choice is said."""
    fits = [k for want in PROMPT_KEYS for k in keys if isinstance(k, str) and k.strip().lower() == want]
    if len(fits) > 1 and line == 1:
        warnings.warn(f"{path}: columns {fits} could each hold the prompt; reading {fits[0]!r}", stacklevel=4)
    return fits[0] if fits else None


def _prompt_of(record, path: Path, line, key: str | None = None) -> str:
    if isinstance(record, str):
        p = record
    elif isinstance(record, dict):
        key = key if key is not None else _prompt_key(record, path, line)
        if key is None:
            raise PromptFileError(f"{path}:{line}: record has none of the columns {PROMPT_KEYS}: {sorted(record)}")
        p = record[key]
    else:
        raise PromptFileError(f"{path}:{line}: expected a string or an object, got {type(record).__name__}")
    if not isinstance(p, str) or not p.strip():
        raise PromptFileError(f"{path}:{line}: empty or non-string prompt")
    return p.strip()


def iter_records(path: str | Path):
    """Every record of a prompt file, one at a time, as a dict with at least 'prompt' and 'line' (1-based).

    Plain text (one prompt a line), JSONL, a JSON list, CSV (with quoting) and TSV (without: a tab ends every
    field, quotes are text, as PartiPrompts' file is written) with a prompt/prompts/text/caption column in any case.
    GenEval metadata keeps 'tag', 'include', 'exclude'; DPG-Bench's csv gives one record per prompt with its
    'questions' (proposition_id, dependency list, category_broad, tuple, question_natural_language). Errors name
    the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _read_dpg_directory(path)
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            rec = dict(obj) if isinstance(obj, dict) else {}
            yield rec | {"prompt": _prompt_of(obj, path, i), "line": i}
    elif suffix == ".json":
        text = "".join(line for _, line in _lines(path))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path}:1: expected a JSON list of prompts or objects")
        for i, obj in enumerate(data):
            rec = dict(obj) if isinstance(obj, dict) else {}
            yield rec | {"prompt": _prompt_of(obj, path, f"item {i}"), "line": i + 1}
    elif suffix in (".csv", ".tsv"):
        yield from _read_table(path, suffix == ".tsv")
    else:
        for i, line in _lines(path):
            if line.strip():
                yield {"prompt": line.strip(), "line": i}


def _rows(path: Path, tsv: bool):
    """(line, row) of a CSV or TSV file, the line where each row starts; csv's own errors name the line."""
    numbered = _lines(path)
    first = [0]

    def lines():
        for i, line in numbered:
            first[0] = first[0] or i
            yield line
    reader = (csv.reader(lines(), delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
              else csv.reader(lines(), strict=True))  # strict: an unclosed quote is an error, not a merge of rows
    while True:
        first[0] = 0
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = " (a quote opened on this line is never closed)" if "end of data" in str(e) else ""
            raise PromptFileError(f"{path}:{first[0] or reader.line_num}: {e}{hint}") from None
        if row:
            yield first[0], row


def _read_table(path: Path, tsv: bool):
    rows = _rows(path, tsv)
    try:
        _, cols = next(rows)
    except StopIteration:
        return
    if "question_natural_language" in cols:  # DPG-Bench: one row per question, grouped by item_id
        yield from _read_dpg(path, cols, rows)
        return
    key = _prompt_key(cols, path, 1)
    if key is None:
        raise PromptFileError(f"{path}:1: header has none of the columns {PROMPT_KEYS} (in any case): {cols}")
    for i, row in rows:
        if len(row) > len(cols):
            raise PromptFileError(f"{path}:{i}: more fields than the header ({len(row)} > {len(cols)})")
        rec = dict(zip(cols, row))
        if key not in rec:
            raise PromptFileError(f"{path}:{i}: no {key!r} field (the row has {len(row)} of {len(cols)} fields)")
        yield rec | {"prompt": _prompt_of(rec, path, i, key), "line": i}


def _read_dpg(path: Path, cols: list[str], rows):
    missing = [c for c in ("item_id", "text", "proposition_id", "dependency", "tuple") if c not in cols]
    if missing:
        raise PromptFileError(f"{path}:1: DPG-Bench csv lacks columns {missing}")
    items: dict[str, dict] = {}
    for i, values in rows:
        if len(values) != len(cols):
            raise PromptFileError(f"{path}:{i}: wrong number of fields ({len(values)}, the header has {len(cols)})")
        row = dict(zip(cols, values))
        try:
            q = {"proposition_id": int(row["proposition_id"]),
                 # the published DSG-1k file has stray words among the parent ids ("5, right"): ids only
                 "dependency": [int(d) for d in row["dependency"].split(",") if d.strip().isdigit()] or [0],
                 "category_broad": row.get("category_broad", ""), "tuple": row["tuple"],
                 "question_natural_language": row["question_natural_language"]}
        except ValueError as e:
            raise PromptFileError(f"{path}:{i}: bad proposition_id or dependency ({e})") from None
        rec = items.setdefault(row["item_id"], {"item_id": row["item_id"], "prompt": _prompt_of(row, path, i, "text"),
                                                "line": i, "questions": []})
        rec["questions"].append(q)
    yield from items.values()


def _read_dpg_directory(path: Path):
    """ELLA's DPG-Bench layout: `dpg_bench.csv` (the questions) and `prompts/<item_id>.txt` (the prompt each image
    is generated from, which the csv's `text` repeats); either alone does."""
    csv_file, prompt_dir = path / "dpg_bench.csv", path / "prompts"
    if not csv_file.is_file() and not prompt_dir.is_dir():
        raise PromptFileError(f"{path}: is a directory, not a prompt file (a DPG-Bench directory, as ELLA's dpg_bench/, "
                              f"holds dpg_bench.csv and prompts/<item_id>.txt: this one has neither)")
    texts = {}
    if prompt_dir.is_dir():
        for f in sorted(prompt_dir.glob("*.txt"), key=lambda f: (len(f.stem), f.stem)):  # 1, 2, ..., 10: numeric
            lines = [line.strip() for _, line in _lines(f) if line.strip()]
            if not lines:
                raise PromptFileError(f"{f}: no prompt in file")
            texts[f.stem] = " ".join(lines)
    if not csv_file.is_file():
        yield from ({"item_id": k, "prompt": v, "line": 1} for k, v in texts.items())
        return
    for rec in _read_table(csv_file, tsv=False):
        yield rec | {"prompt": texts.get(rec.get("item_id"), rec["prompt"])}


def load_records(path: str | Path) -> list[dict]:
    """Every record of a prompt file (`iter_records`); an error if it holds none."""
    records = list(iter_records(path))
    if not records:
        raise PromptFileError(f"{path}: no prompts in file")
    return records


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of any supported prompt file, in file order, keeping nothing else of each record."""
    prompts = [r["prompt"] for r in iter_records(path)]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in file")
    return prompts


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
    metadata for the tag prompts, DPG-Bench csv for the dense prompts). Returns counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = world_prompt_sets(p.seed, p.prompts.n_train, p.prompts.test_per_tag, p.prompts.n_test_dense)
    (out / "train.txt").write_text("".join(grammar.text(s) + "\n" for s in train))
    write_geneval_metadata([s for s in test if s.tag != "dense"], out / "test_geneval.jsonl")
    write_dpg_csv([s for s in test if s.tag == "dense"], out / "test_dpg.csv")
    counts = {"train": len(train), "test_geneval": sum(s.tag != "dense" for s in test),
              "test_dpg": sum(s.tag == "dense" for s in test),
              "train_test_overlap": len({grammar.text(s) for s in train} & {grammar.text(s) for s in test})}
    return counts


def convert_prompt_file(source: str | Path, out: Path, metrics: Path) -> dict:
    """The `extra_prompts` stage: a real prompt file of any supported format written one prompt a line (newlines
    inside a prompt become spaces), and its counts."""
    from .files import write_json
    texts = load_prompts(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    tmp.replace(out)
    counts = {"prompts": len(texts), "unique": len(set(texts)), "source": str(source)}
    write_json(counts, metrics)
    return counts


def test_specs(prompt_dir: Path, per_tag: int | None = None) -> list[grammar.Spec]:
    """The GenEval-tag test prompts of the world as specs, optionally the first `per_tag` of each tag."""
    specs, seen = [], {}
    for r in load_records(Path(prompt_dir) / "test_geneval.jsonl"):
        if per_tag is None or seen.get(r["tag"], 0) < per_tag:
            seen[r["tag"]] = seen.get(r["tag"], 0) + 1
            specs.append(grammar.Spec(grammar.read(r["prompt"]).groups, grammar.read(r["prompt"]).relation, r["tag"]))
    return specs
