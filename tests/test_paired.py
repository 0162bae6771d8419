"""Paired bootstrap intervals and the three verdicts (dmdr.paired)."""
import numpy as np
import pytest

from dmdr.paired import PromptValues, difference, metric_of, verdict


def values(v, strata=None):
    v = np.asarray(v, float)
    strata = np.zeros(len(v), int) if strata is None else np.asarray(strata)
    return PromptValues(v, strata, {s: 1 / len(set(strata.tolist())) for s in set(strata.tolist())})


def test_a_shift_shared_by_every_prompt_is_decided_despite_a_large_spread_between_prompts():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.0, 200)  # prompts differ far more than the models do: pairing removes it
    d, ci = difference([values(base + 0.05 + rng.normal(0, 0.01, 200))], [values(base)])
    assert 0.04 < d < 0.06 and 0 < ci[0] < d < ci[1] < 0.1
    d_unpaired, ci_unpaired = difference([values(rng.permutation(base) + 0.05)], [values(base)])
    assert ci_unpaired[0] < 0 < ci_unpaired[1]  # the same shift without pairing: not decided


def test_the_interval_widens_with_the_spread_over_training_seeds():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1.0, 300)
    tight = [values(base + 0.1 + rng.normal(0, 0.001, 300)) for _ in range(3)]
    loose = [values(base + 0.1 + s + rng.normal(0, 0.001, 300)) for s in (-0.3, 0.0, 0.3)]  # seeds disagree
    _, ci_tight = difference(tight, [values(base)])
    _, ci_loose = difference(loose, [values(base)])
    assert ci_loose[1] - ci_loose[0] > 5 * (ci_tight[1] - ci_tight[0])
    assert ci_loose[0] < 0 < ci_loose[1]


def test_a_stratified_metric_is_recomputed_as_evaluation_computes_it():
    v = values([1, 1, 0, 0, 0, 1], strata=["a", "a", "b", "b", "b", "b"])
    assert metric_of(v.values, v.strata, v.weights) == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)
    d, ci = difference([v], [v])
    assert d == 0 and ci == [0.0, 0.0]


def test_models_evaluated_on_different_prompts_are_refused():
    with pytest.raises(ValueError, match="different prompts"):
        difference([values([1, 2, 3])], [values([1, 2])])


def test_three_verdicts():
    assert verdict([[0.1, 0.2], [0.01, 0.3]]) == "holds"
    assert verdict([[0.1, 0.2], [-0.3, -0.01]]) == "does not hold"
    assert verdict([[0.1, 0.2], [-0.1, 0.3]]) == "inconclusive"
    assert verdict([[0.1, 0.2], None]) == "inconclusive"
    assert verdict([]) == "inconclusive"


def test_the_gap_closed_is_the_students_share_of_the_distance_from_base_to_teacher():
    """A student halfway from the base to the teacher on every prompt closes 0.5 of the gap, within a tight interval
    despite a large spread between prompts; a base at the teacher's level leaves no gap to close."""
    from dmdr.paired import gap_closed
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.0, 200)
    teacher = base + 0.4 + rng.normal(0, 0.01, 200)
    student = base + 0.2
    pv = lambda v: [PromptValues(v, np.zeros(len(v), int), {0: 1.0})]
    f, (low, high) = gap_closed(pv(student), pv(base), pv(teacher))
    assert f == pytest.approx(0.5, abs=0.01) and low < 0.5 < high and high - low < 0.05
    assert np.isnan(gap_closed(pv(student), pv(teacher), pv(teacher))[0])


def test_a_curve_window_check_pairs_every_training_seed(tmp_path):
    """C3's and C4's checks over curve windows take each recipe's seed repeats (`-s1`, `-s2`): three seeds of a run
    that sits 0.05 above the other in the window decide it, and a seed whose curve is missing leaves it undecided."""
    from types import SimpleNamespace
    from dmdr.report import _window_check
    names = [f"{base}{s}" for base in ("stage1", "ablation") for s in ("", "-s1", "-s2")]
    p = SimpleNamespace(recipes={n: {"init": "models/world/teacher"} for n in names}, seed=0)
    rng = np.random.default_rng(0)
    (tmp_path / "curves").mkdir()
    for n in names:
        steps = np.arange(0, 60, 10)
        values = rng.normal(0.5, 0.1, (len(steps), 40)) + (0.05 if n.startswith("stage1") else 0.0) * (steps > 0)[:, None]
        np.savez(tmp_path / "curves" / f"{n}.npz", steps=steps, reward_test=values)
    check = _window_check(p, "", "reward_test", "stage1", "ablation", tmp_path, (10, 50))
    assert check["ci95"][0] > 0 and check["difference"] == pytest.approx(0.05, abs=0.02)
    (tmp_path / "curves" / "ablation-s2.npz").unlink()
    assert _window_check(p, "", "reward_test", "stage1", "ablation", tmp_path, (10, 50))["ci95"] is None


def test_a_models_seed_repeats_join_its_checks_unless_one_run_is_compared(tmp_path, monkeypatch):
    """The claims' checks average each side over its seed repeats (`-s1`, `-s2`: whole lineages) and count the fewest
    runs a side reads; RT-DM's beta figure, whose runs all continue the one seed-0 stage-1 run, compares that run
    alone (`Pairs(..., seeds=False)`)."""
    import json
    from types import SimpleNamespace
    from dmdr.report import Pairs
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    (tmp_path / "data" / "prompts" / "test_geneval.jsonl").write_text(
        "".join(json.dumps({"tag": "single_object", "prompt": f"p{i}"}) + "\n" for i in range(30)))
    (tmp_path / "samples").mkdir()
    base = np.random.default_rng(0).normal(0.5, 0.1, 30)
    shifts = {"a": 0.1, "a-s1": 0.3, "a-s2": 0.5, "b": 0.0}
    for name, shift in shifts.items():
        np.savez(tmp_path / "samples" / f"{name}.npz", score_hps=base + shift)
    p = SimpleNamespace(recipes={n: {} for n in shifts}, seed=0, evaluate=SimpleNamespace(images_per_prompt=1))
    monkeypatch.chdir(tmp_path)
    assert Pairs(p, tmp_path).check("", "hps", "a", "b")["difference"] == pytest.approx(0.3)
    assert Pairs(p, tmp_path, seeds=False).check("", "hps", "a", "b")["difference"] == pytest.approx(0.1)
    assert (Pairs(p, tmp_path).n_seeds("a"), Pairs(p, tmp_path).n_seeds("a", "b")) == (3, 1)
    assert Pairs(p, tmp_path, seeds=False).n_seeds("a") == 1


def test_a_table_row_of_a_model_with_seed_repeats_is_their_mean():
    """The tables show what the claims read: a model's evaluated seed repeats averaged, the count in its name; a model
    without repeats, or whose repeats were not evaluated, as it is."""
    from types import SimpleNamespace
    from dmdr.report import over_seeds
    p = SimpleNamespace(recipes={n: {} for n in ("a", "a-s1", "a-s2", "b", "b-s1")})
    summ = {"a": {"hps": 0.1, "nfe": 4}, "a-s1": {"hps": 0.2, "nfe": 4}, "a-s2": {"hps": 0.6, "nfe": 4},
            "b": {"hps": 0.5, "nfe": 4}, "teacher": {"hps": 0.7, "nfe": 100}}
    rows = over_seeds(p, summ, ["teacher", "a", "b"])
    assert list(rows) == ["teacher", "a (3 seeds)", "b"]
    assert rows["a (3 seeds)"]["hps"] == pytest.approx(0.3) and rows["b"]["hps"] == 0.5
    assert list(over_seeds(p, summ, ["a"], lambda m: f"{m} (init)")) == ["a (init) (3 seeds)"]
