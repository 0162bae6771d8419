"""Reward models: one differentiable interface, weighted sums, preference pairs labelled by gold, and training that
learns the pairs' order."""
import copy

import numpy as np
import pytest
import torch

from dmdr.config import ParamsError
from dmdr.reward_terms import Combined
from dmdr.rewards import (AestheticModel, CosineReward, agreement, bradley_terry_loss,
                          build_pairs, load_aesthetic, parse_spec, save_aesthetic, train_reward)
from dmdr.world import grammar, render


def test_rewards_are_differentiable_in_the_images(clip):
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    texts = ["a photo of a circle"] * 3
    for reward in (CosineReward(clip), AestheticModel(copy.deepcopy(clip))):
        r = reward(images, texts)
        assert r.shape == (3,)
        (g,) = torch.autograd.grad(r.sum(), images)
        assert g.abs().sum() > 0


def test_weighted_sums(clip):
    images, texts = torch.rand(2, 3, 32, 32), ["a photo of a square"] * 2
    a, b = CosineReward(clip), CosineReward(clip)
    both = Combined({"clip": a, "hps": b}, parse_spec("0.5*clip+hps"))
    assert torch.allclose(both(images, texts), 0.5 * a(images, texts) + b(images, texts))
    assert parse_spec("clip+hps") == {"clip": 1.0, "hps": 1.0}
    with pytest.raises(ParamsError, match="unknown reward 'beauty'"):
        parse_spec("beauty")


def test_pairs_are_ordered_by_gold_with_label_noise():
    rng = np.random.default_rng(0)
    specs = [grammar.sample_spec(rng, "two_object") for _ in range(6)]
    blank = np.full((6, 1, 32, 32, 3), 245, np.uint8)  # an empty picture per prompt: worse than its render
    pairs = build_pairs(specs, blank, rng)
    assert len(pairs.images) == 6 * 3 and len(pairs.pairs) >= 6
    gap = pairs.gold[pairs.pairs[:, 0]] - pairs.gold[pairs.pairs[:, 1]]
    assert np.all(np.abs(gap) > 0.02)
    clean = pairs.labels("gold", 0.0, rng)
    assert np.all(pairs.gold[clean[:, 0]] > pairs.gold[clean[:, 1]])
    noisy = pairs.labels("gold", 0.5, np.random.default_rng(1))
    assert 0 < np.mean(pairs.gold[noisy[:, 0]] < pairs.gold[noisy[:, 1]]) < 1


def test_bradley_terry_prefers_the_winner():
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor(5.0)) < \
        bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor(5.0))


def test_training_learns_the_pairs(clip):
    """On renders against blank images (gold clearly apart) a few steps of preference training fit the order."""
    rng = np.random.default_rng(0)
    specs = [grammar.sample_spec(rng, "single_object") for _ in range(16)]
    blank = np.full((16, 1, 32, 32, 3), 245, np.uint8)
    pairs = build_pairs(specs, blank, rng)
    before = agreement(CosineReward(clip), pairs)
    model = train_reward("hps", clip, pairs, steps=40, batch=16, lr=3e-3, label_noise=0.0, seed=0)
    assert agreement(model, pairs) > max(before, 0.8)
    assert not hasattr(model, "log_scale") and not any(p.requires_grad for p in model.parameters())


def test_aesthetic_round_trip(clip, tmp_path):
    model = AestheticModel(copy.deepcopy(clip))
    images = torch.rand(2, 3, 32, 32)
    save_aesthetic(model, tmp_path / "aesthetic")
    again = load_aesthetic(tmp_path / "aesthetic")
    assert torch.allclose(again(images), model(images), atol=1e-6)
    assert render([]).shape == (32, 32, 3)


def test_near_pairs_hold_only_the_models_own_samples_of_one_prompt():
    """Agreement near the model's samples (issue 21's gate) is read on pairs of one prompt's samples alone: no exact
    or degraded render among them, so a reward that only tells renders from samples gets no credit there."""
    from dmdr.world.parse import parse
    from dmdr.world.score import gold
    rng = np.random.default_rng(0)
    specs = [grammar.sample_spec(rng, "two_object") for _ in range(8)]
    own = np.stack([[render(grammar.scene_for(s, rng)), np.full((32, 32, 3), 245, np.uint8)] for s in specs])
    near = build_pairs(specs, own, rng, renders=False)
    assert len(near.images) == 16 and len(near.pairs) == 8
    assert all(a // 2 == b // 2 for a, b in near.pairs)  # both images of a pair are one prompt's
    lookup = {im.tobytes(): g for im, g in zip(near.images, near.gold)}

    class Oracle(torch.nn.Module):  # gold itself, as a reward of images in [-1, 1]
        def forward(self, images, texts):
            uint8 = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            return torch.tensor([lookup[im.tobytes()] for im in uint8])
    assert agreement(Oracle(), near) == 1.0
    assert gold(near.images[0], specs[0], parse(near.images[0])) == pytest.approx(near.gold[0])
