"""The prompt grammar of the embedded world, its reader, and the question lists of dense prompts.

A prompt is a `Spec`: groups of identical objects (a shape with optional count, size and colour) and at most one
spatial relation between the first two groups. Shapes are distinct across groups, so "the circle" is unambiguous.
`text(spec)` writes it; `read(text)` reads it back exactly. GenEval tags (single_object, two_object, counting,
colors, position, color_attr) use "a photo of ..."; dense DPG-style prompts use "a picture of ...".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .scene import COLORS, MAX_OBJECTS, RELATIONS, SHAPES, SIZES

NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_NUMBERS = {v: k for k, v in NUMBERS.items()} | {"one": 1, "an": 1}
MAX_LARGE = 2  # more large objects than this rarely fit on the canvas without touching
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Group:
    shape: str
    count: int = 1
    color: str | None = None
    size: str | None = None

    def phrase(self) -> str:
        words = [NUMBERS[self.count], self.size, self.color, self.shape + ("s" if self.count > 1 else "")]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Spec:
    groups: tuple[Group, ...]
    relation: str | None = None  # groups[0] <relation> groups[1]
    tag: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.groups:
            raise ValueError("a prompt needs at least one object group")
        shapes = [g.shape for g in self.groups]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"shapes must differ across groups: {shapes}")
        if sum(g.count for g in self.groups) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects, got {self.groups}")
        if self.relation is not None and (len(self.groups) < 2 or self.relation not in RELATIONS):
            raise ValueError(f"bad relation {self.relation!r} for {len(self.groups)} groups")
        if not self.tag:
            object.__setattr__(self, "tag", infer_tag(self))


def infer_tag(spec: Spec) -> str:
    """The GenEval tag a spec written in that tag's template has, else 'dense'."""
    g = spec.groups
    plain = all(x.size is None for x in g)
    if not plain:
        return "dense"
    if spec.relation:
        return "position" if len(g) == 2 and all(x.count == 1 and x.color is None for x in g) else "dense"
    if len(g) == 1 and g[0].color is None:
        return "single_object" if g[0].count == 1 else "counting"
    if len(g) == 1 and g[0].count == 1:
        return "colors"
    if len(g) == 2 and all(x.count == 1 for x in g):
        if all(x.color is None for x in g):
            return "two_object"
        if all(x.color is not None for x in g):
            return "color_attr"
    return "dense"


def text(spec: Spec) -> str:
    prefix = "a picture of " if spec.tag == "dense" else "a photo of "
    parts = [g.phrase() for g in spec.groups]
    if spec.relation:
        parts = [f"{parts[0]} {spec.relation} {parts[1]}"] + parts[2:]
    return prefix + " and ".join(parts)


_PHRASE = re.compile(
    rf"^(?P<n>{'|'.join(WORD_NUMBERS)}) (?:(?P<size>{'|'.join(SIZES)}) )?(?:(?P<color>{'|'.join(COLORS)}) )?"
    rf"(?P<shape>{'|'.join(SHAPES)})(?P<plural>s?)$")
_RELATION = re.compile(rf" ({'|'.join(RELATIONS)}) ")


def _group(phrase: str, prompt: str) -> Group:
    m = _PHRASE.match(phrase)
    if not m:
        raise ValueError(f"cannot read {phrase!r} in prompt {prompt!r}")
    n = WORD_NUMBERS[m["n"]]
    if (n > 1) != bool(m["plural"]):
        raise ValueError(f"number and plural disagree in {phrase!r} of prompt {prompt!r}")
    return Group(m["shape"], n, m["color"], m["size"])


def read(prompt: str) -> Spec:
    """Inverse of `text`: the spec of a prompt of this grammar (ValueError naming the prompt otherwise)."""
    s = prompt.strip().rstrip(".").lower()
    for prefix in ("a photo of ", "a picture of "):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    else:
        raise ValueError(f"prompt {prompt!r} does not start with 'a photo of' or 'a picture of'")
    parts = s.split(" and ")
    relation = None
    m = _RELATION.search(parts[0])
    if m:
        relation = m[1]
        parts = [parts[0][:m.start()], parts[0][m.end():]] + parts[1:]
    spec = Spec(tuple(_group(p, prompt) for p in parts), relation)
    if text(spec) != prompt.strip().rstrip(".").lower():  # e.g. "a photo of" with a dense structure
        spec = Spec(spec.groups, spec.relation, tag="dense")
    return spec


def geneval_clauses(spec: Spec) -> tuple[list[dict], list[dict]]:
    """GenEval include / exclude clauses, as in evaluation_metadata.jsonl.

    As GenEval writes "a photo of A above B": include [B, A with position ["above", 0]].
    """
    def clause(g: Group) -> dict:
        c = {"class": g.shape, "count": g.count}
        if g.color:
            c["color"] = g.color
        return c

    if spec.relation:
        ref, obj = clause(spec.groups[1]), clause(spec.groups[0])
        obj["position"] = [spec.relation, 0]
        include = [ref, obj] + [clause(g) for g in spec.groups[2:]]
    else:
        include = [clause(g) for g in spec.groups]
    exclude = [{"class": g.shape, "count": g.count + 1} for g in spec.groups] if spec.tag == "counting" else []
    return include, exclude


def questions(spec: Spec) -> list[dict]:
    """DPG-Bench-style questions: proposition_id (1-based), dependency (parent ids, 0 = none), category, the tuple
    in DPG-Bench's notation, and the natural-language question."""
    qs: list[dict] = []

    def add(category: str, tup: str, question: str, parents: list[int]) -> int:
        qs.append({"proposition_id": len(qs) + 1, "dependency": parents or [0], "category_broad": category,
                   "tuple": tup, "question_natural_language": question})
        return len(qs)

    entity = {}
    for g in spec.groups:
        plural = g.shape + "s"
        e = add("entity", f"entity - whole ({g.shape})",
                f"Is there a {g.shape}?" if g.count == 1 else f"Are there {plural}?", [])
        entity[g.shape] = e
        if g.count > 1:
            add("count", f"other - count ({g.shape}, =={g.count})", f"Are there {NUMBERS[g.count]} {plural}?", [e])
        if g.color:
            add("attribute", f"attribute - color ({g.shape}, {g.color})",
                f"Is the {g.shape} {g.color}?" if g.count == 1 else f"Are the {plural} {g.color}?", [e])
        if g.size:
            add("attribute", f"attribute - size ({g.shape}, {g.size})",
                f"Is the {g.shape} {g.size}?" if g.count == 1 else f"Are the {plural} {g.size}?", [e])
    if spec.relation:
        a, b = spec.groups[0].shape, spec.groups[1].shape
        add("relation", f"relation - spatial ({a}, {b}, {spec.relation})",
            f"Is the {a} {spec.relation} the {b}?", [entity[a], entity[b]])
    return qs


def sample_spec(rng, tag: str) -> Spec:
    """A random spec written in the template of `tag` (a GenEval tag or 'dense')."""
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    colors = [str(c) for c in rng.permutation(list(COLORS))]
    if tag == "single_object":
        return Spec((Group(shapes[0]),))
    if tag == "two_object":
        return Spec((Group(shapes[0]), Group(shapes[1])))
    if tag == "counting":
        return Spec((Group(shapes[0], int(rng.integers(2, MAX_OBJECTS + 1))),))
    if tag == "colors":
        return Spec((Group(shapes[0], color=colors[0]),))
    if tag == "position":
        return Spec((Group(shapes[0]), Group(shapes[1])), str(rng.choice(RELATIONS)))
    if tag == "color_attr":
        return Spec((Group(shapes[0], color=colors[0]), Group(shapes[1], color=colors[1])))
    if tag != "dense":
        raise ValueError(f"unknown prompt tag {tag!r}")
    while True:
        n_groups = int(rng.integers(1, 4))
        counts = [int(rng.integers(1, 3)) for _ in range(n_groups)]
        if sum(counts) > MAX_OBJECTS:
            continue
        groups = tuple(Group(shapes[i], counts[i], colors[i] if rng.random() < 0.8 else None,
                             str(rng.choice(list(SIZES))) if rng.random() < 0.6 else None) for i in range(n_groups))
        relation = str(rng.choice(RELATIONS)) if n_groups >= 2 and counts[:2] == [1, 1] and rng.random() < 0.7 else None
        spec = Spec(groups, relation, tag="dense")
        if sum(g.count for g in groups if g.size == "large") > MAX_LARGE:
            continue
        if any(g.size for g in groups) or relation or n_groups == 3:  # else it reads as a GenEval template
            return spec


def scene_for(spec: Spec, rng, tries: int = 100):
    """A random scene that satisfies the spec exactly: unspecified colours and sizes drawn at random, no other
    objects. Returns a list of `Obj`."""
    from .scene import place, relative_position  # the relation is decided by the benchmark's own rule

    for _ in range(tries):
        objs = []
        for gi, g in enumerate(spec.groups):
            for _ in range(g.count):
                color = g.color or str(rng.choice(list(COLORS)))
                n_large = sum(o.size == "large" for o in objs)
                size = g.size or ("large" if n_large < MAX_LARGE and rng.random() < 0.5 else "small")
                where = None
                if spec.relation and gi == 1:
                    anchor = objs[0]
                    where = lambda o, a=anchor: spec.relation in relative_position(a.box, o.box)
                o = place(rng, g.shape, color, size, objs, where=where)
                if o is None:
                    break
                objs.append(o)
        if len(objs) == sum(g.count for g in spec.groups):
            return objs
    raise RuntimeError(f"could not place a scene for {text(spec)!r}")
