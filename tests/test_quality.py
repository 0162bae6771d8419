"""Table 6's metrics (dmdr.quality, torch-fidelity's code on the world classifier's features) move the way C7 reads
them: a generator that sharpens its density (collapses toward the modes) keeps precision and loses recall; one that
spreads past the data gains recall and loses precision; confident, balanced class predictions raise the IS."""
import pytest
import torch

from dmdr.quality import frechet_distance, inception_score, precision_recall, quality_diversity


@pytest.fixture(scope="module")
def real():
    return torch.randn(1500, 8, generator=torch.Generator().manual_seed(0))


def fresh(scale: float, seed: int = 1) -> torch.Tensor:
    return scale * torch.randn(1500, 8, generator=torch.Generator().manual_seed(seed))


def test_samples_of_the_data_distribution_score_as_the_data(real):
    same = fresh(1.0)
    assert frechet_distance(same, real) < 0.2
    precision, recall = precision_recall(same, real)
    assert precision > 0.8 and recall > 0.8  # k = 3 balls in 8 dimensions miss some of the same distribution


def test_a_sharpened_density_keeps_precision_and_loses_recall(real):
    precision, recall = precision_recall(fresh(0.4), real)
    assert precision > 0.95 and recall < 0.5
    assert frechet_distance(fresh(0.4), real) > 2


def test_a_spread_density_gains_recall_and_loses_precision(real):
    precision, recall = precision_recall(fresh(2.5), real)
    assert recall > 0.9 and precision < 0.5


def test_the_inception_score_counts_confident_balanced_classes():
    classes = 10
    labels = torch.arange(1000) % classes
    confident = 30.0 * torch.nn.functional.one_hot(labels, classes).double()
    assert inception_score(confident, splits=1) == pytest.approx(classes, rel=1e-3)
    assert inception_score(confident) > 0.9 * classes  # parts of 100 samples: their class shares are not equal
    assert inception_score(torch.zeros(1000, classes)) == pytest.approx(1.0)
    one_class = 30.0 * torch.nn.functional.one_hot(torch.zeros(1000, dtype=torch.long), classes).double()
    assert inception_score(one_class) == pytest.approx(1.0, abs=1e-6)


def test_the_table_has_its_four_columns(real):
    row = quality_diversity(fresh(1.0), real, torch.randn(1500, 5))
    assert set(row) == {"fid", "precision", "recall", "inception_score"}


def test_a_classes_images_show_its_class_and_its_caption_names_it():
    """The class-conditional world: each class's renders parse to one object of its shape and colour, and its caption
    reads back (the grammar's) as that object."""
    import numpy as np
    from dmdr.world import grammar, parse
    from dmdr.class_world import CLASSES, caption, class_batch
    assert len(CLASSES) == 18 and len(set(CLASSES)) == 18
    images, labels = class_batch(np.random.default_rng(0), 36)
    for image, c in zip(images, labels):
        (det,) = parse(image)
        assert (det.shape, det.color) == CLASSES[c]
        (group,) = grammar.read(caption(int(c))).groups
        assert (group.shape, group.color, group.count) == (*CLASSES[c], 1)


def test_the_world_classifier_learns_the_classes_and_its_confidence_is_a_reward(tmp_path):
    """The linear probe on a (tiny, random) CLIP's image features learns the 18 classes well above chance from renders;
    its confidence in the asked class is differentiable in the images, and it is saved and read back as trained."""
    import numpy as np
    from dmdr.class_world import class_batch
    from dmdr.classifier import WorldClassifier, accuracy, train_classifier
    from dmdr.evaluator import to_tensor
    from tiny import tiny_clip
    clip = tiny_clip()
    before = accuracy(WorldClassifier(clip).eval(), seed=5, n=360)
    model, info = train_classifier(clip, seed=0, steps=80, batch=64, lr=0.05)
    assert info["accuracy"] > max(3 / 18, 2 * before), (before, info["accuracy"])
    images, labels = class_batch(np.random.default_rng(3), 8)
    x = to_tensor(images).requires_grad_(True)
    conf = model.confidence(x, torch.from_numpy(labels))
    assert conf.shape == (8,) and bool(((conf > 0) & (conf < 1)).all())
    conf.sum().backward()
    assert x.grad.abs().sum() > 0
    model.save(tmp_path / "classifier")
    again = WorldClassifier.load(clip, tmp_path / "classifier")
    assert torch.equal(again(x.detach()), model(x.detach()))


def test_the_class_reward_is_the_confidence_in_the_class_its_prompt_asks_for():
    import numpy as np
    from dmdr.class_world import CAPTIONS, class_batch
    from dmdr.classifier import ClassReward, WorldClassifier
    from dmdr.evaluator import to_tensor
    from tiny import tiny_clip
    classifier = WorldClassifier(tiny_clip()).eval()
    images, labels = class_batch(np.random.default_rng(0), 6)
    x = to_tensor(images)
    asked = [CAPTIONS[(int(c) + 1) % 18] for c in labels]  # another class than drawn: the prompt decides
    expected = classifier.confidence(x, torch.tensor([(int(c) + 1) % 18 for c in labels]))
    assert torch.equal(ClassReward(classifier)(x, asked), expected)
    with pytest.raises(ValueError, match="a photo of two cats"):
        ClassReward(classifier)(x[:1], ["a photo of two cats"])


def test_every_part_holds_as_many_samples_of_each_class():
    import numpy as np
    from dmdr.quality_eval import class_positions, split_of
    labels, split = np.array(class_positions(12)), split_of(12, 4)
    for j in range(4):
        assert np.bincount(labels[split == j], minlength=18).tolist() == [3] * 18


def write_quality(path, feats, real, logits, parts=4):
    import numpy as np
    from dmdr.quality_eval import class_positions, split_of
    path.parent.mkdir(parents=True, exist_ok=True)
    per_class = len(feats) // 18
    np.savez(path, features=feats.numpy(), real_features=real.numpy(), logits=logits.numpy(),
             labels=np.array(class_positions(per_class)), split=split_of(per_class, parts))


@pytest.mark.parametrize("sharpen", [True, False])
def test_c7_reads_a_sharper_density_as_cfg_and_rl_doing_what_the_paper_says(tmp_path, sharpen):
    """Six students whose densities shrink toward the data's centre with CFG and with RL, and whose class predictions
    grow more confident: C7 holds; the same students in reverse order: it does not hold. The checks pair the parts."""
    from dmdr.class_world import CLASSES
    from dmdr.report import CFGS, table6_claims
    n = 18 * 64
    real = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % len(CLASSES)
    order = [f"cls-1-cfg{g}-{rl}" for rl in ("norl", "rl") for g in CFGS]
    sharpness = {m: (i % 3) + 2 * (i // 3) for i, m in enumerate(order)}  # CFG 1 < 1.5 < 4; RL sharper still
    for m, s in sharpness.items():
        s = s if sharpen else 5 - s
        feats = 1.4 * (0.85 ** s) * torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
        logits = (1.0 + s) * torch.nn.functional.one_hot(labels, len(CLASSES)).float()
        write_quality(tmp_path / "quality" / f"{m}.npz", feats, real, logits)
    (c7,) = table6_claims(tmp_path)
    assert c7["id"] == "C7" and len(c7["checks"]) == 21
    assert c7["verdict"] == ("holds" if sharpen else "does not hold"), [(k["name"], k["ci95"]) for k in c7["checks"]]
    assert all(k["ci95"][0] <= k["difference"] <= k["ci95"][1] for k in c7["checks"])


def test_the_classifier_reward_needs_class_prompts_and_the_embedded_world():
    from dmdr import config
    with pytest.raises(config.ParamsError, match="prompts: classes"):
        config.build(config.DistillParams, {"rl": {"weight": 0.1, "reward": "classifier"}})
    cfg = config.build(config.DistillParams, {"prompts": "classes", "rl": {"weight": 0.1, "reward": "classifier"}})
    from dmdr.distill import what_trains
    assert what_trains(cfg)["prompts"] == "classes"
    assert "prompts" not in what_trains(config.DistillParams())  # the records of models trained before it stay theirs


def test_diversity_is_the_spread_within_each_class():
    from dmdr.quality import diversity
    labels = torch.arange(600) % 3
    noise = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
    assert diversity(noise + 10 * labels[:, None], labels) == pytest.approx(diversity(noise, labels))  # not between
    assert diversity(0.5 * noise, labels) == pytest.approx(0.5 * diversity(noise, labels))
    assert diversity(torch.zeros(600, 4) + labels[:, None], labels) == 0
