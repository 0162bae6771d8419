"""The engine's per-trainee learning-rate schedule and EMA, as the world's stand-ins use them (dmdr.standins.Fit)."""
import math

import torch
from diffusers.training_utils import EMAModel

from dmdr.loop import Engine, Settings, Trainee, run
from dmdr.standins import Fit, warmup_cosine


def test_the_schedule_steps_with_each_update_and_the_ema_follows_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ema = EMAModel(model.parameters(), decay=0.5)
    x = torch.randn(8, 4)
    engine = Engine(Settings())
    trainee = Trainee("model", "model", model, list(model.parameters()), 0.1, schedule=warmup_cosine(2, 5), ema=ema)
    method = Fit(engine, trainee, lambda step: model(x).pow(2).mean(), "fit")
    engine.prepare(method)
    initial = [p.clone() for p in model.parameters()]
    run(engine, method, steps=3, log_every=1)
    factor = warmup_cosine(2, 5)(3)  # LambdaLR's factor after 3 updates
    assert math.isclose(engine.trainees["model"].optimizer.param_groups[0]["lr"], 0.1 * factor)
    assert ema.optimization_step == 3
    shadow = ema.shadow_params
    assert not all(torch.equal(s, p) for s, p in zip(shadow, initial))  # it moved
    assert not all(torch.equal(s, p) for s, p in zip(shadow, model.parameters()))  # an average, not a copy
