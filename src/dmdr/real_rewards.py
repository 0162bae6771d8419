"""The paper's reward models, with their own preprocessing and scale, behind the interface of dmdr.rewards:
`reward(images, texts) -> (B,)`, images (B, 3, H, W) in [-1, 1], differentiable in the images (ReFL).

- clip: DFN5B-CLIP-ViT-H-14 (open_clip, quick-GELU): cosine(image, text).
- hps: HPSv2.1, an open_clip ViT-H-14 with the HPS checkpoint: cosine(image, text), the score HPSv2 reports.
- pick: PickScore (transformers CLIPModel and its CLIPProcessor's settings): logit_scale * cosine, as its authors
  score.
- aesthetic: the LAION aesthetic MLP on the L2-normalised image embedding of OpenAI CLIP ViT-L/14, built with
  its QuickGELU (open_clip builds GELU for a local file or the "openai" tag and only warns).

Preprocessing is the models' own (resize of the shortest side with the given interpolation and antialiasing,
centre crop, mean / std), written with torch ops so gradients reach the images. The pixels enter a model in its
weights' dtype (a model held in bf16 runs without autocast under mixed_precision bf16-weights); scores are fp32.
Checkpoints load as safetensors or with torch.load(weights_only=True) (the HPS and aesthetic files are plain state
dicts); nothing runs remote code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """A CLIP image pipeline: shortest side to `size` (or both sides when resize_mode is 'squash'), centre crop,
    normalise."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1], what ToTensor gives
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            hw = (self.size, self.size)
        elif self.resize_mode == "shortest":
            scale = self.size / min(h, w)
            hw = (round(h * scale), round(w * scale))
        else:
            raise ValueError(f"resize mode {self.resize_mode!r} is not supported (shortest, squash)")
        if hw != (h, w):
            x = F.interpolate(x, size=hw, mode=self.interpolation, align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def open_clip_preprocess(model) -> Preprocess:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    return Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"),
                      cfg.get("resize_mode", "shortest"))


def image_embedding(model, preprocess: Preprocess, images: torch.Tensor) -> torch.Tensor:
    """The L2-normalised fp32 embedding of images in [-1, 1] by an open_clip model, the pixels in its weights'
    device and dtype."""
    w = next(model.parameters())
    return F.normalize(model.encode_image(preprocess(images).to(w.device, w.dtype)).float(), dim=-1)


def read_state_dict(path: Path) -> dict:
    """Weights from safetensors, or from a torch file of plain tensors (weights_only: no code is unpickled); a
    checkpoint that nests them under 'state_dict' (HPS) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


class OpenClipReward(nn.Module):
    """scale * cosine(image, text) of an open_clip model (DFN5B-CLIP and HPSv2.1: scale 1)."""

    def __init__(self, model, tokenizer, scale: float = 1.0):
        super().__init__()
        self.model, self.tokenizer, self.scale = model, tokenizer, scale
        self.preprocess = open_clip_preprocess(model)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        img = image_embedding(self.model, self.preprocess, images)
        txt = F.normalize(self.model.encode_text(self.tokenizer(texts).to(img.device)).float(), dim=-1)
        return self.scale * (img * txt).sum(-1)


class PickScore(nn.Module):
    """PickScore: logit_scale.exp() * cosine of a transformers CLIPModel, preprocessed as its CLIPProcessor does."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.tokenizer = model, processor.tokenizer
        ip = processor.image_processor
        size = ip.crop_size["height"] if ip.do_center_crop else ip.size["shortest_edge"]
        self.preprocess = Preprocess(size, tuple(ip.image_mean), tuple(ip.image_std))

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(device)
        # (transformers casts the pixels to the model's dtype itself)
        img = F.normalize(projected(self.model.get_image_features(pixel_values=self.preprocess(images).to(device)))
                          .float(), dim=-1)
        txt = F.normalize(projected(self.model.get_text_features(**tokens)).float(), dim=-1)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)


def projected(features) -> torch.Tensor:
    """CLIPModel.get_*_features: a tensor, or (transformers 5) an output whose pooler_output is the projection."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor's head (its `layers` names, so its state dict loads as released)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LaionAesthetic(nn.Module):
    """LAION aesthetic score: the MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt-blind)."""

    def __init__(self, clip_model, head: AestheticMLP):
        super().__init__()
        self.model, self.head = clip_model, head
        self.preprocess = open_clip_preprocess(clip_model)

    def forward(self, images: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        img = image_embedding(self.model, self.preprocess, images)
        return self.head(img.to(next(self.head.parameters()).dtype)).float().squeeze(-1)


def open_clip_model(arch: str, checkpoint: str | Path, quick_gelu: bool = False):
    """An open_clip model of `arch` with weights from a local file, or a pretrained tag such as 'dfn5b' / 'openai'
    that open_clip fetches from the hub (on machines that reach it)."""
    import open_clip
    if Path(str(checkpoint)).suffix in (".safetensors", ".pt", ".pth", ".bin"):
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
        model.load_state_dict(read_state_dict(Path(checkpoint)))
    else:
        model = open_clip.create_model(arch, pretrained=str(checkpoint), force_quick_gelu=quick_gelu)
    return model.eval(), open_clip.get_tokenizer(arch)


def load_real_reward(kind: str, checkpoint: str | Path, arch: str | None = None, processor: str | Path | None = None,
                     clip_checkpoint: str | Path | None = None) -> nn.Module:
    """One of the paper's rewards, frozen. `kind`: clip (DFN5B: arch ViT-H-14, quick-GELU, checkpoint 'dfn5b' or a
    file), hps (arch ViT-H-14, checkpoint the HPS_v2.1 file), pick (checkpoint a CLIPModel directory or hub id,
    processor the CLIPProcessor's), aesthetic (checkpoint the MLP's file, clip_checkpoint ViT-L/14's: 'openai' or
    a file)."""
    if kind == "clip":
        model, tok = open_clip_model(arch or "ViT-H-14", checkpoint, quick_gelu=True)
        reward = OpenClipReward(model, tok)
    elif kind == "hps":
        model, tok = open_clip_model(arch or "ViT-H-14", checkpoint)
        reward = OpenClipReward(model, tok)
    elif kind == "pick":
        from transformers import CLIPModel, CLIPProcessor
        reward = PickScore(CLIPModel.from_pretrained(checkpoint, use_safetensors=True).eval(),
                           CLIPProcessor.from_pretrained(processor or checkpoint))
    elif kind == "aesthetic":  # OpenAI's CLIP, with its QuickGELU (open_clip would build GELU and only warn)
        model, _ = open_clip_model(arch or "ViT-L-14", clip_checkpoint or "openai", quick_gelu=True)
        state = read_state_dict(Path(checkpoint))
        head = AestheticMLP(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        reward = LaionAesthetic(model, head)
    else:
        raise ValueError(f"unknown real reward {kind!r}; expected clip, hps, pick or aesthetic")
    return reward.requires_grad_(False).eval()
