"""The math of DMDR's stage-1 tools and joint loss: RT-DM on a one-dimensional Gaussian world, the DynaDG and
DynaRS schedules, Eq. 3 at lambda 0, and the LoRA machinery of DynaDG."""
import copy
import math

import pytest
import torch

from dmdr import flow
from dmdr import rl
from dmdr.config import RLParams
from dmdr.distill import cosine_anneal, dmd_gradient, dmd_loss, dynadg_scale, dynars_beta, fake_weights, joint_loss, \
    rtdm_weights
from dmdr.lora import add_generator_lora, add_lora, fused_copy, load_lora_state, lora_state, plain, set_lora_scale
from dmdr.models import VelocityModel, build_backbone
from test_dmd import gaussian_x0

BETA = 1.0  # reward r(x) = x, teacher N(0, 1): the tilted target p(x) exp(x / beta) is N(1 / beta, 1)


def weighted_gaussian(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """The Gaussian a fake score fits to samples x under per-sample loss weights w (its optimum)."""
    w = w / w.sum()
    mean = (w * x).sum()
    return float(mean), float(((w * (x - mean) ** 2).sum()).sqrt())


def run_rtdm(tilt_fake: bool, steps: int = 400, n: int = 4096, lr: float = 0.05) -> tuple[float, float]:
    """Generator x = mu + sigma z trained with the RT-DM-weighted DMD gradient against the exact real score of
    N(0, 1) and the fake score's optimum on the current generator samples."""
    mu, log_sigma = torch.tensor([-1.0]), torch.tensor([math.log(0.5)])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        mu.requires_grad_(True)
        log_sigma.requires_grad_(True)
        x0 = mu + log_sigma.exp() * torch.randn(n, 1, generator=g)
        r = x0.detach()[:, 0]
        fw = fake_weights(r, BETA) if tilt_fake else torch.ones(n)
        fake_mean, fake_std = weighted_gaussian(x0.detach()[:, 0], fw)
        t = 0.02 + 0.96 * torch.rand(n, generator=g)
        x_t = flow.renoise(x0.detach(), torch.randn(x0.shape, generator=g), t)
        grad = dmd_gradient(x0.detach(), gaussian_x0(torch.tensor([0.0]), 1.0)(x_t, t),
                            gaussian_x0(torch.tensor([fake_mean]), fake_std)(x_t, t))
        dmd_loss(x0, grad, rtdm_weights(r, BETA)).backward()
        with torch.no_grad():
            mu, log_sigma = mu - lr * mu.grad, log_sigma - lr * log_sigma.grad
    return float(mu), float(log_sigma.exp())


def test_rtdm_converges_to_the_tilted_distribution():
    mu, sigma = run_rtdm(tilt_fake=True)
    assert abs(mu - 1 / BETA) < 0.15 and abs(sigma - 1.0) < 0.15, (mu, sigma)


def test_rtdm_weights_alone_keep_the_teacher_as_fixed_point():
    """Weighting only the generator's DMD gradient changes which samples learn, not where learning ends: the
    reason `rtdm.tilt_fake` exists (see distill.rtdm_weights)."""
    mu, sigma = run_rtdm(tilt_fake=False)
    assert abs(mu) < 0.15 and abs(sigma - 1.0) < 0.15, (mu, sigma)


def test_rtdm_weight_forms():
    r = torch.tensor([0.1, 0.2, 0.3, 0.4])
    w = rtdm_weights(r, 0.1)
    assert torch.isclose(w.mean(), torch.tensor(1.0)) and torch.all(w[1:] > w[:-1])
    assert torch.allclose(rtdm_weights(r, 1e6), torch.ones(4), atol=1e-4)  # beta -> inf: plain DMD
    assert torch.allclose(rtdm_weights(r, 0.1, "reward"), r / r.mean())
    assert torch.allclose(fake_weights(r, 0.1) * rtdm_weights(r, 0.1), fake_weights(r, 0.1)[0] * rtdm_weights(r, 0.1)[0])


def test_schedules_hit_their_endpoints():
    assert cosine_anneal(0, 100) == 1.0 and cosine_anneal(100, 100) == 0.0 and cosine_anneal(250, 100) == 0.0
    assert dynadg_scale(0, 2000, 0.5) == 0.5 and dynadg_scale(2000, 2000, 0.5) == 0.0
    # released code: 0.5 * 0.5 * (1 + cos(pi step / K))
    assert math.isclose(dynadg_scale(500, 2000, 0.5), 0.25 * (1 + math.cos(math.pi / 4)))
    assert dynars_beta(0, 100, 4.0, 1.5) == (4.0, 1.5)
    assert dynars_beta(100, 100, 4.0, 1.5) == (1.0, 1.0) and dynars_beta(300, 100, 4.0, 1.5) == (1.0, 1.0)
    a, b = dynars_beta(50, 100, 4.0, 1.5)
    assert 1 < a < 4 and 1 < b < 1.5


def test_joint_loss_reduces_to_dmd_at_lambda_zero():
    x0 = torch.randn(6, 4, requires_grad=True)
    grad = torch.randn(6, 4)
    refl = rl.make(RLParams(loss="refl"))
    loss_rl = lambda: refl.loss(x0, [""] * 6, lambda x, texts: [(1.0, (x ** 2).sum(1))])[0]
    joint_loss(dmd_loss(x0, grad), loss_rl(), 0.0).backward()
    joint = x0.grad.clone()
    x0.grad = None
    dmd_loss(x0, grad).backward()
    assert torch.equal(joint, x0.grad)
    x0.grad = None
    joint_loss(dmd_loss(x0, grad), loss_rl(), 0.5).backward()
    assert not torch.allclose(joint, x0.grad)


def test_rl_objectives():
    """ReFL and the released hinge as RL plug-ins (dmdr.rl): each given the reward's weighted terms on x0."""
    def loss(name, parts, margin=0.7):
        return rl.make(RLParams(loss=name, margin=margin)).loss(torch.zeros(2), ["a", "b"], lambda x0, texts: parts)

    r = torch.tensor([0.5, 0.9])
    assert loss("refl", [(1.0, r)])[0] == -0.7 and torch.isclose(loss("refl", [(1.0, r)])[1], torch.tensor(0.7))
    assert torch.isclose(loss("hinge", [(1.0, r)])[0], torch.tensor(0.1))
    with pytest.raises(ValueError, match="unknown RL objective .ppo.; known: dpo, grpo, hinge, refl"):
        rl.make(RLParams(loss="ppo"))
    # a weighted sum of rewards: ReFL on the sum, the released hinge on each reward (0.3 relu(0.7 - r_k) summed)
    clip, hps = torch.tensor([0.5, 0.9]), torch.tensor([0.8, 0.1])
    parts = [(0.3, clip), (0.3, hps)]
    assert torch.isclose(loss("refl", parts)[0], -(0.3 * clip + 0.3 * hps).mean())
    assert torch.isclose(loss("hinge", parts)[0], torch.tensor(0.3 * 0.1 + 0.3 * 0.3))
    assert torch.isclose(loss("hinge", parts, margin=0.9)[0], torch.tensor(0.3 * 0.2 + 0.3 * 0.45))


def test_lora_scale_interpolates_and_fuses():
    torch.manual_seed(0)
    model = VelocityModel(build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    cond = (torch.randn(2, 5, 16), torch.randn(2, 16))
    base = model(x, t, *cond).detach()
    params = add_lora(model, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    set_lora_scale(model, 0.0)
    assert torch.allclose(model(x, t, *cond), base, atol=1e-6)
    set_lora_scale(model, 2.0)
    adapted = model(x, t, *cond).detach()
    assert not torch.allclose(adapted, base, atol=1e-3)
    model.backbone.set_adapters(["dynadg"], weights=[2.0])  # peft's own scale: the same function
    assert torch.allclose(model(x, t, *cond), adapted, atol=1e-6)
    set_lora_scale(model, 0.0)  # and ours still takes effect after peft wrote its floats
    assert torch.allclose(model(x, t, *cond), base, atol=1e-6)
    set_lora_scale(model, 2.0)
    fused = fused_copy(model, 2.0)
    assert not any("lora_" in n for n, _ in fused.named_parameters())
    assert torch.allclose(fused(x, t, *cond), adapted, atol=1e-5)

    # the adapter's weights carry over to another copy of the base (stage 1's shared LoRA into stage 2)
    other = VelocityModel(build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8)).eval()
    other.load_state_dict({k: v for k, v in fused_copy(model, 0.0).state_dict().items()})
    load_lora_state(other, 4, lora_state(model))
    set_lora_scale(other, 2.0)
    assert torch.allclose(other(x, t, *cond), adapted, atol=1e-6)
    with pytest.raises(ValueError, match="rank 4.*dynadg.rank 8"):
        load_lora_state(VelocityModel(build_backbone("unet", 16, 16, channels=(16, 16), head_dim=8)), 8,
                        lora_state(model))


def test_a_lora_generator_starts_as_its_start_trains_only_its_adapter_and_merges():
    torch.manual_seed(0)
    start = VelocityModel(build_backbone("sd3", 16, 16, layers=1, heads=2, head_dim=8)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    cond = (torch.randn(2, 5, 16), torch.randn(2, 16))
    generator = copy.deepcopy(start)
    add_generator_lora(generator, rank=4, alpha=8.0)
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("add_q_proj" in n for n in trainable)  # SD3's joint attention: the text stream's projections too
    assert torch.allclose(generator(x, t, *cond), start(x, t, *cond), atol=1e-6)  # B = 0 at init
    with torch.no_grad():
        for n, p in generator.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    merged = plain(generator)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(x, t, *cond), generator(x, t, *cond), atol=1e-5)
    assert plain(start) is start


def test_the_effective_sample_size_of_rtdm_weights_falls_as_beta_falls():
    from dmdr.distill import effective_sample_size, rtdm_weights
    r = torch.linspace(0, 1, 16)
    ess = [float(effective_sample_size(rtdm_weights(r, beta))) for beta in (100.0, 0.25, 0.05, 0.001)]
    assert ess[0] == pytest.approx(16, rel=1e-3) and ess[-1] == pytest.approx(1, rel=1e-3)
    assert all(a > b for a, b in zip(ess, ess[1:]))


def test_per_prompt_rtdm_weights_tilt_each_prompts_samples_on_their_own():
    from dmdr.distill import effective_sample_size, rtdm_weights
    r = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.5, 0.7])
    w = rtdm_weights(r, 0.1, group=3)
    assert torch.allclose(w.reshape(2, 3).sum(1), torch.tensor([3.0, 3.0]))  # each prompt's run keeps its mass
    shifted = r + torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])  # one prompt's rewards all higher
    assert torch.allclose(rtdm_weights(shifted, 0.1, group=3), w)  # per prompt: nothing changes
    assert not torch.allclose(rtdm_weights(shifted, 0.1), rtdm_weights(r, 0.1))  # batch-wide: prompts re-weighted
    assert torch.equal(rtdm_weights(r, 0.1, group=6), rtdm_weights(r, 0.1))
    assert float(effective_sample_size(w, 3)) < 3 and float(effective_sample_size(torch.ones(6), 3)) == 3


@pytest.mark.parametrize("group", [0, 4])
def test_the_beta_rule_gives_the_target_effective_sample_size(group):
    from dmdr.distill import beta_for_ess, effective_sample_size, rtdm_weights
    r = torch.randn(16, generator=torch.Generator().manual_seed(0)) * 0.05
    for fraction in (0.3, 0.5, 0.9):
        beta = beta_for_ess(r, fraction, group)
        ess = float(effective_sample_size(rtdm_weights(r, beta, group=group), group))
        assert ess == pytest.approx(fraction * (group or 16), rel=1e-3)
    assert beta_for_ess(r * 10, 0.5, group) == pytest.approx(10 * beta_for_ess(r, 0.5, group), rel=1e-3)
