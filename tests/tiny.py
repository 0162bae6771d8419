"""Tiny real models for fast tests: an open_clip CLIP, a diffusers backbone and VAE, a CLIP reward; tiny real
pipelines (SD3) saved like the hub's."""
import torch
from diffusers import AutoencoderKL

from dmdr.config import DistillParams, build, deep_merge
from dmdr.distill import init_models
from dmdr.config import ClipConfig
from dmdr.models import LatentDecoder, VelocityModel, build_backbone, build_vae
from dmdr.tiny_clip import TinyClip
from dmdr.rewards import CosineReward


def tiny_clip() -> TinyClip:
    torch.manual_seed(0)
    return TinyClip(ClipConfig(embed_dim=16, width=16, vision_layers=1, text_layers=1, heads=2)).eval()


def tiny_models(clip, kind: str = "unet", overrides: dict | None = None, reward=None):
    """(cfg, teacher, Models) of a 2-step run at batch 4 on a random tiny teacher; `overrides` merge into the
    recipe defaults."""
    torch.manual_seed(0)
    kw = dict(channels=(16, 16), head_dim=8) if kind == "unet" else dict(layers=1, heads=2, head_dim=8)
    teacher = VelocityModel(build_backbone(kind, 16, 16, **kw)).eval()
    encode = lambda texts: tuple(x.detach() for x in clip.encode(texts))
    vae = build_vae((16, 16, 16)).eval().requires_grad_(False)
    cfg = build(DistillParams, deep_merge(dict(steps=2, batch=4, ttur=1, log_every=1, mixed_precision="no",
                                               generator_steps=2), overrides or {}))
    reward = reward if reward is not None else CosineReward(clip).requires_grad_(False)
    models = init_models(teacher, encode, encode([""]), cfg=cfg, decode=LatentDecoder(vae),
                         reward=reward)
    return cfg, teacher, models


# --- tiny real pipelines: the real diffusers / transformers classes from small configs, saved like the hub's -----


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_clip_tokenizer(max_length: int = 16):
    """A character-level BPE vocabulary (no merges) in the real CLIPTokenizer."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: len(vocab) + i for i, c in enumerate(CHARS)}
    vocab |= {c + "</w>": len(vocab) + i for i, c in enumerate(CHARS)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in CHARS] + [("\u2581" + c, -1.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# the text encoders of the tiny real pipelines: CLIP text models over tiny_clip_tokenizer's vocabulary
TINY_CLIP_TEXT = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                      num_attention_heads=4, num_hidden_layers=2, vocab_size=80, max_position_embeddings=16,
                      projection_dim=32)


def tiny_sd3_pipeline(path, sd35: bool = False):
    """A random StableDiffusion3Pipeline (transformer, 16-channel VAE, two CLIP text encoders with projection, T5)
    at 16 x 16 pixels, saved with save_pretrained. `sd35`: the transformer of SD3.5 (RMS norms of queries and keys,
    as SD3.5-Large; its first block with SD3.5-Medium's second, image-only attention)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=80, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                          caption_projection_dim=32, pooled_projection_dim=64,
                                          **(dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {})),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=16, sample_size=16, shift_factor=0.0609,
                          scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT)),
        text_encoder_3=t5, tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer())
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_sdxl_pipeline(path):
    """A random StableDiffusionXLPipeline (UNet with SDXL's text-time micro-conditioning, epsilon prediction on the
    scaled-linear VP schedule, 4-channel VAE, CLIP text encoder + CLIP with projection) at 16 x 16 pixels, saved with
    save_pretrained."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=64, transformer_layers_per_block=(1, 1),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=16, sample_size=16, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT)),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer())
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY_OPEN_CLIP = "dmdr-tiny-vit"


def register_tiny_open_clip(directory) -> str:
    """Register a tiny open_clip architecture (open_clip's own tokenizer) under TINY_OPEN_CLIP; returns its name."""
    import json
    import os
    from pathlib import Path

    import open_clip
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = Path(directory) / f"{TINY_OPEN_CLIP}.json"
    if not path.exists():  # the processes of a launch share the file: written whole, by a rename, never truncated
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(cfg))
        os.replace(staging, path)
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def free_port() -> int:
    """A free TCP port for a torchrun rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _route_on_cpu(kind: str, setup) -> None:
    """For scripts run by `accelerate launch` with an accelerate config of `kind` (FSDP, DEEPSPEED) on a machine
    without a GPU, where accelerate does not route it: the loop's Accelerator starts as accelerate's multi-CPU one
    (gloo, the right ranks), is switched to `kind` as accelerate does on GPUs, and `setup(acc)` gives it the plugin
    that the launcher's environment describes. The rest is accelerate's, torch's and DeepSpeed's own."""
    import os

    import accelerate
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    import dmdr.loop

    if os.environ.get(f"ACCELERATE_USE_{kind}") != "true" or torch.cuda.is_available():
        return

    def accelerator(**kwargs):
        acc = accelerate.Accelerator(**kwargs)
        for state in (AcceleratorState, PartialState):
            state._shared_state["distributed_type"] = DistributedType[kind]
        setup(acc)
        return acc

    dmdr.loop.Accelerator = accelerator


def fsdp_on_cpu() -> None:
    """FSDP2 on CPU, for configs/accelerate/fsdp.yaml: accelerate's state would stay MULTI_CPU under the
    environment the launcher sets from the config."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    def setup(acc):
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    _route_on_cpu("FSDP", setup)


def deepspeed_on_cpu() -> None:
    """DeepSpeed on CPU, for configs/accelerate/deepspeed.yaml: accelerate routes it only when not told `cpu`, and
    then, without a GPU, finds no backend and counts one process. DeepSpeed runs its CPU accelerator on the gloo
    group."""
    from accelerate.utils import DeepSpeedPlugin

    def setup(acc):
        if acc.state.deepspeed_plugins is None:  # one plugin, shared by the Accelerator of each engine
            plugin = DeepSpeedPlugin()
            plugin.select(_from_accelerator_state=True)
            acc.state.deepspeed_plugins = plugin
        acc.deepspeed_engine_wrapped = None  # set by accelerate only when it routes DeepSpeed itself
    _route_on_cpu("DEEPSPEED", setup)

