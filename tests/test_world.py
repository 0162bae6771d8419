"""The embedded world: render -> parse round trip, the grammar, the benchmark-analogue scorers, the gold function."""
import numpy as np
import pytest
from scipy import ndimage

from dmdr.world import Obj, parse, render
from dmdr.world import grammar
from dmdr.world.parse import mild_corruption, scene_exact_rate
from dmdr.world.score import dpg_question_scores, geneval_correct, gold, relative_position


def test_parser_reads_clean_renders_scene_exact():
    assert scene_exact_rate(300, seed=0) >= 0.98


def test_parser_on_noisy_renders():
    rate = scene_exact_rate(300, seed=1, corrupt=True)
    print(f"noisy-render scene-exact parse rate: {rate:.3f}")
    assert rate >= 0.9, rate


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_the_parsers_lattice_coverage_is_the_renderers_coverage_bit_for_bit(shape):
    from dmdr.world.scene import coverage, lattice_coverage, subpixel_grid
    rng = np.random.default_rng(0)
    x0, y0, w, h = 3, 5, 19, 17  # a window like parse's, candidates around and across its edges
    side = rng.integers(4, 18, 64).astype(np.float64)
    cx, cy = x0 + rng.integers(-4, 2 * w + 8, 64) / 2, y0 + rng.integers(-4, 2 * h + 8, 64) / 2
    fast = lattice_coverage(shape, side, cx, cy, x0, y0, w, h)
    exact = np.stack([coverage(shape, s, x, y, *subpixel_grid(x0, y0, w, h)) for s, x, y in zip(side, cx, cy)])
    assert fast.dtype == exact.dtype and np.array_equal(fast, exact)
    assert 0 < fast.mean() < 1
    with pytest.raises(ValueError, match="multiples of 1/8 px"):
        lattice_coverage(shape, side, cx + 0.01, cy, x0, y0, w, h)


def test_parse_reports_boxes_and_confidence():
    img = render([Obj("square", "blue", 10, 10.0, 12.0)])
    (d,) = parse(img)
    assert (d["shape"], d["color"], d.size) == ("square", "blue", "small")
    assert np.allclose(d["box"], (5, 7, 15, 17), atol=0.6)
    assert d["confidence"] > 0.95


@pytest.mark.parametrize("shape", [(32, 32), (64, 64, 3), (32, 32, 4)])
def test_parse_rejects_images_of_the_wrong_size(shape):
    with pytest.raises(ValueError, match=rf"32x32x3 image \(the world's size\), got shape \{shape}"[:-1]):
        parse(np.zeros(shape, np.uint8))


def test_blank_and_noise_images_have_no_confident_objects():
    rng = np.random.default_rng(2)
    assert parse(render([])) == []
    noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert all(d.confidence < 0.9 for d in parse(noise))


@pytest.mark.parametrize("tag", grammar.GENEVAL_TAGS + ("dense",))
def test_grammar_round_trip_and_renders_satisfy_their_prompt(tag):
    rng = np.random.default_rng(3)
    for _ in range(20):
        spec = grammar.sample_spec(rng, tag)
        text = grammar.text(spec)
        assert grammar.read(text) == spec and grammar.read(text).tag == tag
        image = render(grammar.scene_for(spec, rng))
        include, exclude = grammar.geneval_clauses(spec)
        assert geneval_correct(parse(image), include, exclude, spec.tag), text
        raw, post = dpg_question_scores(grammar.questions(spec), parse(image))
        assert min(post) == 1.0, text


def test_read_rejects_text_outside_the_grammar():
    for bad in ["a photo of a dog", "two circles", "a photo of two circle", "a photo of a circle and a circle"]:
        with pytest.raises(ValueError):
            grammar.read(bad)


# --- GenEval rules, one hand-made case per tag ----------------------------------------------------------------

def geneval(prompt, objs):
    spec = grammar.read(prompt)
    include, exclude = grammar.geneval_clauses(spec)
    return geneval_correct(parse(render(objs)), include, exclude, spec.tag)


def test_geneval_single_and_two_objects():
    assert geneval("a photo of a circle", [Obj("circle", "red", 8, 10, 10)])
    assert geneval("a photo of a circle", [Obj("circle", "red", 8, 10, 10), Obj("square", "blue", 8, 24, 24)])
    assert not geneval("a photo of a circle", [Obj("square", "red", 8, 10, 10)])
    assert geneval("a photo of a circle and a square", [Obj("circle", "red", 8, 8, 8), Obj("square", "blue", 8, 24, 24)])
    assert not geneval("a photo of a circle and a square", [Obj("circle", "red", 8, 8, 8)])


def test_geneval_counting_is_exact():
    three = [Obj("triangle", "green", 7, x, 16) for x in (6, 16, 26)]
    assert geneval("a photo of three triangles", three)
    assert not geneval("a photo of two triangles", three)  # exclude clause: fewer than three
    assert not geneval("a photo of four triangles", three)


def test_geneval_colors_and_color_attribution():
    assert geneval("a photo of a blue square", [Obj("square", "blue", 12, 16, 16)])
    assert not geneval("a photo of a red square", [Obj("square", "blue", 12, 16, 16)])
    pair = [Obj("circle", "red", 9, 8, 8), Obj("square", "yellow", 9, 24, 24)]
    assert geneval("a photo of a red circle and a yellow square", pair)
    assert not geneval("a photo of a yellow circle and a red square", pair)  # colours swapped: leaked binding


def test_geneval_position_uses_box_centres():
    left = [Obj("circle", "red", 8, 6, 16), Obj("square", "blue", 8, 26, 16)]
    assert geneval("a photo of a circle left of a square", left)
    assert not geneval("a photo of a circle right of a square", left)
    assert not geneval("a photo of a circle above a square", left)
    stacked = [Obj("circle", "red", 8, 16, 6), Obj("square", "blue", 8, 16, 26)]
    assert geneval("a photo of a circle above a square", stacked)
    assert geneval("a photo of a square below a circle", stacked)


def test_relative_position_rule():
    assert relative_position((0, 0, 4, 4), (10, 0, 14, 4)) == {"left of"}
    assert relative_position((0, 0, 4, 4), (10, 10, 14, 14)) == {"left of", "above"}  # diagonal: both
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # overlap within 0.1 * (dims): no relation


def test_counting_needs_confident_detections():
    spec = grammar.read("a photo of two circles")
    include, exclude = grammar.geneval_clauses(spec)
    blurred = ndimage.gaussian_filter(render([Obj("circle", "red", 8, 8, 16), Obj("circle", "red", 8, 24, 16)])
                                      .astype(float), sigma=(1.5, 1.5, 0)).astype(np.uint8)
    dets = parse(blurred)
    assert all(d.confidence < 0.9 for d in dets)
    assert not geneval_correct(dets, include, exclude, "counting")


# --- DPG rules ------------------------------------------------------------------------------------------------

def test_dpg_dependency_zeroes_children_of_a_failed_parent():
    spec = grammar.read("a picture of a large red circle left of a small blue square")
    qs = grammar.questions(spec)
    no_circle = parse(render([Obj("square", "blue", 8, 24, 16)]))
    raw, post = dpg_question_scores(qs, no_circle)
    by_tuple = {q["tuple"]: (r, s) for q, r, s in zip(qs, raw, post)}
    assert by_tuple["entity - whole (circle)"] == (0.0, 0.0)
    assert by_tuple["relation - spatial (circle, square, left of)"][1] == 0.0  # a parent failed
    assert by_tuple["entity - whole (square)"] == (1.0, 1.0)
    assert by_tuple["attribute - color (square, blue)"] == (1.0, 1.0)


def test_dpg_dependency_zeros_cascade_down_a_chain_as_ellas_script_applies_them():
    """ELLA's compute_dpg_bench.py zeroes in file order, reading the parents' scores as already zeroed: a failed
    grandparent zeroes its grandchild through the zeroed parent, though the parent's own answer was yes."""
    from dmdr.world.score import dependency_zeroed
    qs = [{"proposition_id": 1, "dependency": [0]}, {"proposition_id": 2, "dependency": [1]},
          {"proposition_id": 3, "dependency": [2]}, {"proposition_id": 4, "dependency": [0]}]
    assert dependency_zeroed(qs, {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}
    assert dependency_zeroed(qs, {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}) == {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_a_dpg_item_whose_parent_is_missing_is_dropped_with_a_warning_naming_it():
    """As upstream, where the missing parent's KeyError drops the image from every score."""
    from dmdr.evaluation import dpg_scores
    good = {"item_id": "7", "prompt": "a circle", "questions": grammar.questions(grammar.read("a picture of a circle"))}
    bad = {"item_id": "8", "prompt": "a broken item", "questions": [
        {"proposition_id": 1, "dependency": [0], "category_broad": "entity", "tuple": "entity - whole (circle)"},
        {"proposition_id": 2, "dependency": [5], "category_broad": "relation", "tuple": "entity - whole (square)"}]}
    circle = parse(render([Obj("circle", "red", 12, 16, 16)]))
    with pytest.warns(UserWarning, match=r"DPG item 8 \('a broken item'\): question 2 depends on 5, which is not a "
                                         r"question: dropped"):
        scores = dpg_scores([good, bad], [circle, circle], per_prompt=1)
    assert scores == dpg_scores([good], [circle], per_prompt=1) and scores["dpg_overall"] == 100.0


def test_dpg_attribute_and_count_questions():
    spec = grammar.read("a picture of two green triangles and a large purple circle")
    objs = [Obj("triangle", "green", 7, 6, 6), Obj("triangle", "orange", 7, 26, 6), Obj("circle", "purple", 13, 16, 22)]
    raw, post = dpg_question_scores(grammar.questions(spec), parse(render(objs)))
    tuples = [q["tuple"] for q in grammar.questions(spec)]
    got = dict(zip(tuples, post))
    assert got["other - count (triangle, ==2)"] == 1.0
    assert got["attribute - color (triangle, green)"] == 0.0  # one of them is orange
    assert got["attribute - size (circle, large)"] == 1.0


# --- gold -----------------------------------------------------------------------------------------------------

def test_gold_prefers_faithful_clean_images():
    rng = np.random.default_rng(4)
    prompt = "a photo of a red circle and a blue square"
    good = render([Obj("circle", "red", 10, 10, 16), Obj("square", "blue", 10, 22, 16)])
    wrong = render([Obj("circle", "blue", 10, 10, 16), Obj("square", "red", 10, 22, 16)])
    noisy = mild_corruption(good, rng)
    extra = render([Obj("circle", "red", 10, 10, 16), Obj("square", "blue", 10, 22, 16), Obj("triangle", "green", 8, 16, 4)])
    off_centre = render([Obj("circle", "red", 8, 5, 5), Obj("square", "blue", 8, 16, 5)])
    g = gold(good, prompt)
    assert 0.9 < g <= 1.0
    assert gold(wrong, prompt) < g - 0.1
    assert gold(noisy, prompt) < g
    assert gold(extra, prompt) < g
    assert gold(off_centre, prompt) < g
    assert gold(render([]), prompt) < 0.3


def test_geneval_overall_is_the_unweighted_mean_of_tag_accuracies():
    from dmdr.world.score import geneval_summary
    out = geneval_summary([("counting", True)] + [("colors", False)] * 3)
    assert out == {"geneval_colors": 0.0, "geneval_counting": 1.0, "geneval_overall": 0.5}
