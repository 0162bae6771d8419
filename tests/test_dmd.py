"""The DMD gradient (Eq. 1) on a Gaussian world where both scores are known in closed form."""
import torch

from dmdr import flow
from dmdr.distill import dmd_gradient, dmd_loss


def gaussian_x0(mean: torch.Tensor, std: float):
    """E[x0 | x_t] for data N(mean, std^2) under x_t = (1 - t) x0 + t eps: the exact clean prediction."""
    def predict(x_t, t):
        t = t.view(-1, *[1] * (x_t.dim() - 1))
        gain = (1 - t) * std ** 2 / ((1 - t) ** 2 * std ** 2 + t ** 2)
        return mean + gain * (x_t - (1 - t) * mean)
    return predict


def dmd_step_grad(mu_fake: torch.Tensor, mu_real: torch.Tensor, std=0.5, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = mu_fake.clone().requires_grad_(True)
    x0 = mu + std * torch.randn(n, mu.numel(), generator=g)
    t = 0.02 + 0.96 * torch.rand(n, generator=g)
    x_t = flow.renoise(x0.detach(), torch.randn(x0.shape, generator=g), t)
    grad = dmd_gradient(x0.detach(), gaussian_x0(mu_real, std)(x_t, t), gaussian_x0(mu_fake, std)(x_t, t))
    dmd_loss(x0, grad).backward()
    return mu.grad


def test_dmd_gradient_points_down_the_kl():
    mu_real = torch.tensor([1.0, -2.0])
    mu_fake = torch.tensor([-1.0, 0.5])
    grad = dmd_step_grad(mu_fake, mu_real)
    # KL(N(mu_f, s) || N(mu_r, s)) = |mu_f - mu_r|^2 / 2s^2 has gradient along mu_f - mu_r
    cos = torch.nn.functional.cosine_similarity(grad, mu_fake - mu_real, dim=0)
    assert cos > 0.99, cos


def test_dmd_descent_reaches_the_real_distribution():
    mu_real, mu = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 0.5])
    for step in range(300):
        mu = mu - 0.5 * dmd_step_grad(mu, mu_real, seed=step)
    assert torch.allclose(mu, mu_real, atol=0.05), mu


def test_dmd_gradient_vanishes_when_fake_matches_real():
    mu = torch.tensor([0.3, 0.7])
    assert dmd_step_grad(mu, mu).abs().max() < 1e-6


def test_dmd_loss_weight_scales_samples():
    x0 = torch.randn(4, 3, requires_grad=True)
    grad = torch.ones(4, 3)
    dmd_loss(x0, grad, weight=torch.tensor([1.0, 0.0, 2.0, 0.0])).backward()
    assert x0.grad[1].abs().max() == 0 and torch.allclose(x0.grad[2], 2 * x0.grad[0])
