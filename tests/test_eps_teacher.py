"""The world's epsilon teacher (stage teacher_eps): a UNet predicting the noise on SD's VP schedule, trained, sampled
and distilled through its velocity view (models.EpsilonAsFlow), checked against diffusers' own DDPM and Euler
schedulers on the raw UNet."""
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from dmdr import config, flow
from dmdr.config import ParamsError, TeacherParams, build
from dmdr.embedded import WorldFamily
from dmdr.models import EpsilonAsFlow, build_backbone
from dmdr.standins import epsilon_schedule

from tiny import tiny_clip


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8).eval()


@pytest.fixture(scope="module")
def cond():
    clip = tiny_clip()
    with torch.no_grad():
        return tuple(x.detach() for x in clip.encode(["a red circle", "two blue squares"])), \
            tuple(x.detach() for x in clip.encode([""]))


def raw_eps(unet, x_vp, timesteps, cond):
    """The UNet called as the world calls it: pooled text as its class embedding."""
    return unet(x_vp, timesteps, encoder_hidden_states=cond[0], class_labels=cond[1]).sample


def test_the_epsilon_loss_through_the_flow_view_is_ddpms(unet, cond):
    """flow.epsilon_loss at the flow times of integer timesteps = DDPM's loss: the UNet at those timesteps on
    DDPMScheduler.add_noise's points, against the noise."""
    schedule = epsilon_schedule()
    timesteps = torch.tensor([0, 250, 999])
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    c = tuple(torch.cat([x, x[:1]]) for x in cond[0])
    with torch.no_grad():
        theirs = torch.nn.functional.mse_loss(raw_eps(unet, schedule.add_noise(x0, noise, timesteps), timesteps, c),
                                              noise)
        t = flow.vp_flow_times(schedule.alphas_cumprod, timesteps)
        ours = flow.epsilon_loss(EpsilonAsFlow(unet, schedule.alphas_cumprod), x0, c, t, noise)
    assert torch.allclose(ours, theirs, rtol=1e-4), (float(ours), float(theirs))


def test_the_teacher_sampler_in_the_flow_view_is_diffusers_euler_on_the_unet(unet, cond):
    """flow.sample_teacher at the schedule's own Euler levels (vp_sampler_times), from noise scaled to the first,
    ends where diffusers' EulerDiscreteScheduler ends on the raw UNet from the same noise, with CFG. Both start from
    VP noise, eps sqrt(k0^2 + 1) (diffusers' init_noise_sigma with "trailing" spacing is k0 alone, 0.2% less)."""
    schedule = epsilon_schedule()
    (states, pooled), (u_states, u_pooled) = cond
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps, cfg = 6, 3.0
    sched = EulerDiscreteScheduler.from_config(schedule.config)
    sched.set_timesteps(steps)
    x = noise * (sched.sigmas[0] ** 2 + 1) ** 0.5
    with torch.no_grad():
        for ts in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([x, x]), ts)
            e_c, e_u = raw_eps(unet, x_in, ts, (torch.cat([states, u_states.expand_as(states)]),
                                                torch.cat([pooled, u_pooled.expand_as(pooled)]))).chunk(2)
            x = sched.step(e_u + cfg * (e_c - e_u), ts, x).prev_sample
        sigmas = flow.vp_sampler_times(schedule, steps)
        ours = flow.sample_teacher(EpsilonAsFlow(unet, schedule.alphas_cumprod),
                                   noise * flow.start_noise_scale(sigmas[0]), (states, pooled), (u_states, u_pooled),
                                   steps, cfg, sigmas=sigmas)
    assert sigmas[0] == pytest.approx(EpsilonAsFlow(unet, schedule.alphas_cumprod).max_t)
    assert torch.allclose(ours, x, atol=2e-4), float((ours - x).abs().max())


def test_the_epsilon_family_samples_at_dmd2s_timesteps_and_refuses_a_shift(unet):
    fam = WorldFamily(epsilon_schedule())
    abar = fam.schedule.alphas_cumprod.double()
    k = ((1 - abar) / abar).sqrt()
    expected = [float(k[j] / (1 + k[j])) for j in (999, 749, 499, 249)] + [0.0]
    assert fam.generator_times(4).tolist() == pytest.approx(expected, abs=1e-6)
    assert fam.max_t == pytest.approx(expected[0]) and fam.prediction == "epsilon"
    assert fam.generator_times(1)[0] == pytest.approx(float(k[399] / (1 + k[399])), abs=1e-6)
    with pytest.raises(ValueError, match="shift"):
        fam.generator_times(4, shift=3.0)
    assert isinstance(fam.wrap(unet), EpsilonAsFlow) and WorldFamily().max_t == 1.0


def test_a_saved_epsilon_generator_is_read_back_as_one(unet, tmp_path):
    """WorldFamily.of reads an exported model's family from its sampler file and the schedule beside it."""
    from dmdr import sampler
    from dmdr.embedded import SCHEDULER_DIR
    epsilon_schedule().save_pretrained(tmp_path / SCHEDULER_DIR)
    sampler.write(tmp_path, sampler.settings(4, 1.0, [0.9, 0.0], prediction="epsilon"))
    fam = WorldFamily.of(tmp_path)
    assert fam.prediction == "epsilon" and torch.equal(fam.schedule.alphas_cumprod, epsilon_schedule().alphas_cumprod)
    flow_dir = tmp_path / "flow"
    flow_dir.mkdir()
    sampler.write(flow_dir, sampler.settings(4, 1.0, [1.0, 0.0]))
    assert WorldFamily.of(flow_dir).schedule is None


def test_an_epsilon_teachers_settings_are_checked():
    with pytest.raises(ParamsError, match="prediction, teacher_eps.timesteps"):
        build(TeacherParams, {"prediction": "epsilon", "timesteps": "logit_normal"}, "teacher_eps")
    with pytest.raises(ParamsError, match="teacher_eps.prediction, teacher_eps.backbone"):
        build(TeacherParams, {"prediction": "epsilon", "timesteps": "uniform", "backbone": "sd3"}, "teacher_eps")


def test_a_lineage_distils_the_teacher_its_first_recipe_starts_from():
    p = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    assert config.teacher_of(p, "dmdr-eps-4") == config.TEACHER_EPS
    assert config.teacher_of(p, "dmdr-4") == config.TEACHER
    bad = dataclasses.replace(p, recipes=p.recipes | {"x": {"init": "models/teacher_epsilon"}})
    with pytest.raises(ParamsError, match="neither a teacher"):
        config.recipe(bad, "x")


def test_the_epsilon_teacher_learns_the_noise(cond):
    """A few updates of the epsilon teacher's training (standins.train_teacher's loss) lower DDPM's loss on
    held-out noise: the loss drives the UNet's noise prediction, not its velocity."""
    from dmdr.standins import train_loop
    torch.manual_seed(0)
    schedule = epsilon_schedule()
    model = EpsilonAsFlow(build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8), schedule.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 4, 8, 8, generator=g).clamp(-1, 1).sign() * 0.8  # a simple data distribution
    c = tuple(x.expand(8, *x.shape[1:]) for x in cond[1])

    def loss_at(gen):
        j = torch.randint(1000, (8,), generator=gen)
        return flow.epsilon_loss(model, x0, c, flow.vp_flow_times(schedule.alphas_cumprod, j),
                                 torch.randn(x0.shape, generator=gen))

    held_out = lambda: loss_at(torch.Generator().manual_seed(99)).item()
    before = held_out()
    train_loop(model, lambda step: loss_at(g), steps=40, lr=3e-3, desc="eps", warmup=1)
    with torch.no_grad():
        after = held_out()
    assert after < 0.8 * before, (before, after)
