"""The world's CLIP: an open_clip CLIP with a custom config and a word tokenizer over the world's vocabulary. It is
the teachers' text encoder and the clip reward; fine-tuned, the hps and pick analogues (dmdr.rewards)."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ClipConfig
from .models import atomic_dir, require_dir
from .world.grammar import NUMBERS, WORD_NUMBERS
from .world.scene import COLORS, RELATIONS, SHAPES, SIZES


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: pad 0, unknown 1, words, then start and end of text; the end
    token has the highest id because open_clip pools the text at the argmax token."""

    def __init__(self, words: list[str], context_length: int):
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        self.sot, self.eot = len(self.words) + 2, len(self.words) + 3
        self.vocab_size = len(self.words) + 4
        self.context_length = context_length

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.index.get(w, 1) for w in t.lower().replace(",", " ").replace(".", " ").split()]
            ids = [self.sot] + ids[: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def world_vocabulary() -> list[str]:
    words = {"a", "photo", "picture", "of", "and", "the", "is", "are", "there"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(SIZES) | set(WORD_NUMBERS) | set(NUMBERS.values())
    for r in RELATIONS:
        words |= set(r.split())
    return sorted(words)


class TinyClip(nn.Module):
    """An open_clip CLIP with a custom config and the world's word tokenizer.

    `encode(texts)` gives the per-token states (B, L, width) that condition the teachers, and the pooled projected
    embedding (B, embed_dim) used by SD3-style pooled conditioning and by the CLIP score.
    """

    def __init__(self, cfg: ClipConfig, words: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = WordTokenizer(words or world_vocabulary(), cfg.context_length)
        self.clip = open_clip.model.CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg=open_clip.model.CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.width,
                                                     head_width=cfg.width // cfg.heads, patch_size=cfg.patch_size,
                                                     image_size=cfg.image_size),
            text_cfg=open_clip.model.CLIPTextCfg(context_length=cfg.context_length, vocab_size=self.tokenizer.vocab_size,
                                                 width=cfg.width, heads=cfg.heads, layers=cfg.text_layers),
        )

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.clip
        tokens = self.tokenizer(texts).to(c.token_embedding.weight.device)
        x = c.token_embedding(tokens) + c.positional_embedding
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ c.text_projection \
            if not isinstance(c.text_projection, nn.Linear) else c.text_projection(x[torch.arange(x.shape[0]), tokens.argmax(-1)])
        return x, pooled

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self.encode(texts)[1], dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1]."""
        return nn.functional.normalize(self.clip.encode_image(images), dim=-1)

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP score: 100 * cosine(image, text), per pair (differentiable)."""
        return 100 * (self.encode_image(images) * self.encode_text(texts)).sum(-1)

    def save(self, path: Path) -> Path:
        def write(d: Path):
            save_file({k: v.contiguous() for k, v in self.clip.state_dict().items()}, d / "model.safetensors")
            (d / "config.json").write_text(json.dumps({"clip": vars(self.cfg), "words": self.tokenizer.words}, indent=1))
        return atomic_dir(path, write)

    @classmethod
    def load(cls, path: Path) -> "TinyClip":
        path = require_dir(path, "CLIP")
        cfg = json.loads((path / "config.json").read_text())
        m = cls(ClipConfig(**cfg["clip"]), cfg["words"])
        m.clip.load_state_dict(load_file(path / "model.safetensors"))
        return m.eval()
