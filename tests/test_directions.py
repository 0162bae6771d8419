"""The loop pushes the way the equations say: a DMD step moves the generator's samples toward the real score's
clean prediction and away from the fake score's (Eq. 1), and an RL step raises the reward (Eq. 3). Swapping the two
scores where the method calls dmd_gradient, or flipping the RL term's sign, fails these."""
import pytest
import torch
from torch import nn

from dmdr import flow
from dmdr.distill import train
from tiny import tiny_models

PROMPTS = ["a photo of a circle", "a photo of two squares", "a red triangle"]


class PredictsX0(nn.Module):
    """A score whose clean-sample prediction is `target` wherever it is asked: v = (x_t - target) / t. Its one
    parameter gets no gradient, so training leaves it as it is."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, *cond):
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t).view(-1, 1, 1, 1)
        return (x - self.target) / t + 0 * self.unused


class Brightness(nn.Module):
    """A reward: the mean pixel value of the image."""

    def forward(self, images, texts):
        return images.mean(dim=(1, 2, 3))


def mean_sample(models, cfg) -> float:
    """The mean of the generator's few-step samples of the prompts, from fixed noise."""
    noise = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x0 = flow.sample_generator(models.generator.eval(), noise, models.encode(PROMPTS),
                                   flow.generator_times(cfg.generator_steps, cfg.shift))
    return float(x0.mean()), x0


@pytest.mark.parametrize("real_level, fake_level", [(-1.0, 1.0), (1.0, -1.0)])
def test_dmd_moves_samples_toward_the_real_score_and_away_from_the_fake(clip, real_level, fake_level):
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-3})
    before, x0 = mean_sample(models, cfg)
    models.real = PredictsX0(torch.full_like(x0[0], real_level))
    models.fake = PredictsX0(torch.full_like(x0[0], fake_level))
    train(cfg, models, PROMPTS, seed=0)
    after, _ = mean_sample(models, cfg)
    assert (after - before) * real_level > 0.05, (before, after)


@pytest.mark.parametrize("objective", ["refl", "hinge"])
def test_rl_raises_the_reward(clip, objective):
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-2, "dmd_weight": 0.0,
                                                "rl": {"weight": 1.0, "loss": objective, "margin": 10.0}},
                                 reward=Brightness())
    reward = lambda: float(Brightness()(models.decode(mean_sample(models, cfg)[1]), PROMPTS).mean())
    before = reward()
    train(cfg, models, PROMPTS, seed=0)
    assert reward() > before + 0.005, (before, reward())


class OwnReFL:
    """A Sampling objective (dmdr.rl): ReFL on fresh few-step samples it draws itself, through the whole ODE. It
    records what it was given, so the test can check the hook's contract."""

    def __init__(self):
        self.sampled, self.parts = [], []

    def sample(self, policy, texts, terms):
        self.sampled.append(torch.is_grad_enabled())
        return {"noise": policy.noise(), "texts": texts}

    def loss_on(self, policy, samples, terms):
        self.parts.append(len(samples["texts"]))
        x0 = policy.sample(samples["noise"], policy.encode(samples["texts"]))
        r = sum(w * r for w, r in terms(x0, samples["texts"]))
        return -r.mean(), r.mean().detach()


@pytest.mark.parametrize("dmd_weight", [0.0, 1.0])
def test_an_objective_that_samples_itself_raises_the_reward(clip, monkeypatch, dmd_weight):
    """The plug-in hook for objectives with their own samples (GRPO's groups, DPO's pairs): `sample` runs once per
    generator update without gradient, `loss_on` on each micro-batch's slice of its samples, and its loss moves the
    generator up the reward, alone or beside DMD."""
    from dmdr import rl
    objective = OwnReFL()
    monkeypatch.setattr(rl, "make", lambda params: objective)
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-2, "dmd_weight": dmd_weight,
                                                "batch": 4, "micro_batches": 2, "ttur": 1,
                                                "rl": {"weight": 1.0 if dmd_weight == 0 else 50.0}},
                                 reward=Brightness())
    reward = lambda: float(Brightness()(models.decode(mean_sample(models, cfg)[1]), PROMPTS).mean())
    before = reward()
    train(cfg, models, PROMPTS, seed=0)
    assert objective.sampled == [False] * 6 and objective.parts == [2] * 12
    assert reward() > before + 0.005, (before, reward())


def test_the_training_reward_sees_valid_images(clip):
    """Images beyond the valid range are clamped before the reward: a decoder whose every pixel lies past white
    leaves ReFL on brightness no gradient, so the generator does not move (unclamped, it would brighten)."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 3, "generator_lr": 1e-2, "generator_weight_decay": 0.0,
                                                "dmd_weight": 0.0, "rl": {"weight": 1.0, "loss": "refl"}},
                                 reward=Brightness())
    models.decode = lambda z: z + 10.0
    _, before = mean_sample(models, cfg)
    train(cfg, models, PROMPTS, seed=0)
    assert torch.equal(mean_sample(models, cfg)[1], before)


class CondTarget(nn.Module):
    """A score predicting clean sample `cond_level` for a prompt and `uncond_level` for the empty prompt (told apart
    by the pooled text state), everywhere."""

    def __init__(self, uncond_pooled: torch.Tensor, shape, cond_level: float, uncond_level: float):
        super().__init__()
        self.register_buffer("uncond", uncond_pooled.reshape(1, -1))
        self.shape, self.levels = shape, (cond_level, uncond_level)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, *cond):
        empty = (cond[-1].reshape(len(x), -1) == self.uncond).all(1).float().view(-1, 1, 1, 1)
        target = self.levels[0] + (self.levels[1] - self.levels[0]) * empty
        t = (t.expand(x.shape[0]) if t.dim() == 0 else t).view(-1, 1, 1, 1)
        return (x - target) / t + 0 * self.unused


@pytest.mark.parametrize("real_cfg, direction", [(1.0, 1), (3.0, -1)])
def test_the_real_score_applies_its_guidance(clip, real_cfg, direction):
    """Real score: prompt -> before + 0.5, empty prompt -> before + 1. Unguided it pulls samples up; at CFG 3 the
    guided prediction is before + 1 + 3 (0.5 - 1) = before - 0.5, so DMD pulls them down."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 6, "generator_lr": 1e-3, "real_cfg": real_cfg})
    before, x0 = mean_sample(models, cfg)
    models.real = CondTarget(models.uncond[-1], x0.shape[1:], before + 0.5, before + 1.0)
    models.fake = PredictsX0(torch.full_like(x0[0], before))
    train(cfg, models, PROMPTS, seed=0)
    after, _ = mean_sample(models, cfg)
    assert (after - before) * direction > 0.05, (before, after)


def test_the_fake_score_learns_the_generators_samples(clip):
    """A generator whose every sample is the image c: after the fake-score turns, the fake predicts c from renoised
    c far better than before (trained on other samples, it would not)."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 8, "ttur": 5, "fake_lr": 3e-3})
    c = torch.linspace(-0.8, 0.8, 4 * 8 * 8).reshape(4, 8, 8)
    models.generator, models.latent_shape = PredictsX0(c), (4, 8, 8)
    x_t = flow.renoise(c.expand(4, -1, -1, -1), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
                       torch.full((4,), 0.5))
    cond = models.encode(PROMPTS + PROMPTS[:1])

    def error():
        with torch.no_grad():
            return float((flow.x0_from_velocity(x_t, models.fake.eval()(x_t, torch.full((4,), 0.5), *cond),
                                                torch.full((4,), 0.5)) - c).abs().mean())
    before = error()
    train(cfg, models, PROMPTS, seed=0)
    assert error() < 0.6 * before, (before, error())


def test_the_rollout_reports_the_level_its_sample_was_renoised_to():
    """rollout's x_t is the ODE's output renoised to the level it returns: x_t = (1 - t_k) x0 + t_k eps."""
    from dmdr.distill import rollout
    c = torch.full((2, 4, 8, 8), 0.3)
    times = flow.generator_times(4, 1.0)
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = set()
    for seed in range(12):
        x_t, t_k, final = rollout(PredictsX0(c[0]), torch.randn(2, 4, 8, 8), (), times,
                                  torch.Generator().manual_seed(seed), "renoise", True, lambda: eps)
        assert torch.allclose(final, c, atol=1e-5)
        assert torch.allclose(x_t, (1 - t_k) * c + t_k * eps, atol=1e-5) if t_k < 1 else True
        seen.add(t_k)
    assert len(seen) > 1  # levels are drawn, and each is reported as used


def test_dynadg_anneals_the_lora_of_the_model_that_is_the_real_score(clip, monkeypatch):
    """Where the generator's DMD gradient calls the real score, DynaDG's LoRA scale on that model follows
    scale * cosine_anneal(step, K)."""
    import dmdr.distill as distill
    cfg, _, models = tiny_models(clip, "unet", {"steps": 5, "dynadg": {"form": "paper", "steps": 4, "scale": 0.8}})
    used, real_calls = [], []
    guided = flow.guided_velocity

    def recording(model, *args):
        real_calls.append(model)
        used.append(float(distill.backbone_of(model)._dynadg_scale))
        return guided(model, *args)
    monkeypatch.setattr(flow, "guided_velocity", recording)
    train(cfg, models, PROMPTS, seed=0)
    assert all(m is real_calls[0] for m in real_calls)
    scored, i = [], 0
    while i < len(used):  # while the scale is above 0, the logged pull calls the plain real score (LoRA 0) next
        scored.append(used[i])
        i += 2 if used[i] > 0 else 1
    assert used[1] == 0.0 and scored == pytest.approx([distill.dynadg_scale(s, 4, 0.8) for s in range(5)], abs=1e-6)


def test_rtdm_with_a_tilted_fake_score_moves_samples_toward_the_tilt(clip):
    """RT-DM with `tilt_fake`: the fake score learns the generator's samples down-weighted by exp(-r / beta), so DMD
    drives the generator toward p_real exp(r / beta): with brightness as the reward, samples end brighter than the
    same run without the tilt."""
    def brightness_after(tilt: bool) -> float:
        cfg, _, models = tiny_models(clip, "unet", {"steps": 10, "ttur": 5, "fake_lr": 3e-3, "generator_lr": 1e-3,
                                                    "rtdm": {"enabled": True, "beta": 0.01, "tilt_fake": tilt}},
                                     reward=Brightness())
        models.decode = lambda z: z  # the reward reads the latents' brightness
        models.real = PredictsX0(mean_sample(models, cfg)[1].mean(0))
        train(cfg, models, PROMPTS, seed=0)
        return mean_sample(models, cfg)[0]
    untilted, tilted = brightness_after(False), brightness_after(True)
    assert tilted > untilted + 0.002, (untilted, tilted)


def test_per_prompt_rtdm_sets_beta_by_its_rule_before_training(clip):
    """rtdm.target_ess sets beta before training from the start generator's own samples, so that the first step's
    weights keep about that fraction of each prompt's run of samples (the probe batch is not the first step's)."""
    cfg, _, models = tiny_models(clip, "unet", {"steps": 1, "batch": 8, "samples_per_prompt": 4,
                                                "rtdm": {"enabled": True, "normalise": "prompt", "target_ess": 0.5}},
                                 reward=Brightness())
    rows = train(cfg, models, PROMPTS, seed=0)
    assert 1.2 < rows[1]["rtdm_ess"] < 3.2  # of 4
