"""The world classifier of Table 6: a linear probe on the independent CLIP's image features (the clip_score CLIP),
trained on renders of the class-conditional world's 18 classes (dmdr.world.classes). It plays the paper's
DINOv2-based classifier twice: its confidence in the asked class is the RL reward, and its features and logits are
what FID, precision, recall and the Inception Score are computed from (dmdr.quality)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .evaluator import to_tensor
from .models import atomic_dir, require_dir
from .tiny_clip import TinyClip
from .class_world import CLASSES, class_batch, class_of

HEAD_FILE = "head.safetensors"


class WorldClassifier(nn.Module):
    """logits = W (f(x) - m) / s + b over the frozen CLIP's normalised image features f(x), standardised by their
    mean m and std s on renders (`standardise`), as linear probes are; images in [-1, 1]."""

    def __init__(self, clip: TinyClip, classes: int = len(CLASSES)):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.head = nn.Linear(clip.cfg.embed_dim, classes)
        self.register_buffer("mean", torch.zeros(clip.cfg.embed_dim))
        self.register_buffer("std", torch.ones(clip.cfg.embed_dim))

    @torch.no_grad()
    def standardise(self, images: torch.Tensor) -> None:
        f = self.features(images)
        self.mean.copy_(f.mean(0))
        self.std.copy_(f.std(0).clamp_min(1e-6))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(images))

    def confidence(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(asked class | image), differentiable in the images: the reward."""
        return self(images).softmax(-1).gather(1, labels.view(-1, 1)).squeeze(1)

    def save(self, path: Path) -> Path:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()} | {"mean": self.mean, "std": self.std}
        return atomic_dir(path, lambda d: save_file({k: v.contiguous() for k, v in state.items()}, d / HEAD_FILE))

    @classmethod
    def load(cls, clip: TinyClip, path: Path) -> "WorldClassifier":
        model = cls(clip)
        state = load_file(require_dir(path, "world classifier") / HEAD_FILE)
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
        model.mean.copy_(state["mean"])
        model.std.copy_(state["std"])
        return model.eval()


class ClassReward(nn.Module):
    """r(x, c) = p_classifier(c | x), the class c read from the prompt (its caption): the reward of Table 6's RL, as
    the paper's DINOv2 classifier's probability of the asked ImageNet class. A reward's protocol: (images in
    [-1, 1], prompts) -> one score per image."""

    def __init__(self, classifier: WorldClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        labels = torch.tensor(class_of(list(texts)), device=images.device)
        return self.classifier.confidence(images, labels)


@torch.no_grad()
def accuracy(model: WorldClassifier, seed: int, n: int = 900) -> float:
    """Top-1 accuracy on n fresh renders."""
    images, labels = class_batch(np.random.default_rng(seed), n)
    return float((model(to_tensor(images)).argmax(1).numpy() == labels).mean())


def train_classifier(clip: TinyClip, seed: int, steps: int, batch: int, lr: float) -> tuple[WorldClassifier, dict]:
    """The probe by the generic loop (dmdr.standins.train_loop) on fresh renders each step, cross-entropy; returns
    it and its held-out accuracy."""
    from .standins import train_loop
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = WorldClassifier(clip)
    model.standardise(to_tensor(class_batch(rng, 1024)[0]))

    def loss_fn(step):
        images, labels = class_batch(rng, batch)
        return nn.functional.cross_entropy(model(to_tensor(images)), torch.from_numpy(labels))

    history = train_loop(model.head, loss_fn, steps, lr, desc="world classifier", warmup=max(1, steps // 20))
    model.eval()
    return model, {"history": history, "accuracy": accuracy(model, seed + 1000)}
