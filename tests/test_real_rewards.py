"""The paper's reward models through their real classes (open_clip, transformers CLIPModel, the LAION head) at tiny
sizes, saved in their released formats: the differentiable scores equal the libraries' own preprocessing and
scoring, and gradients reach the images."""
import copy
import open_clip
import pytest
import torch
from PIL import Image

from dmdr.models import compile_blocks
from dmdr.real_rewards import AestheticMLP, load_real_reward, projected, read_state_dict
from tiny import TINY_OPEN_CLIP, register_tiny_open_clip, tiny_clip_tokenizer

ARCH = TINY_OPEN_CLIP
TEXTS = ["a photo of a cat", "two red squares"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    return register_tiny_open_clip(tmp_path_factory.mktemp("cfg"))


def uint8_images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] on the uint8 grid, so PIL and torch see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1


def pil(images: torch.Tensor) -> list:
    return [Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for x in images]


def reference_open_clip(model, preprocess, images, texts):
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in pil(images)]))
        txt = model.encode_text(open_clip.get_tokenizer(ARCH)(texts))
    return torch.nn.functional.cosine_similarity(img, txt)


def check_compiled_blocks(reward, images):
    """`compile` (dmdr.models.compile_blocks) finds the reward's blocks; its scores and their gradient to the
    images stay the same (aot_eager: dynamo and AOTAutograd traces, run without generated code)."""
    def score_and_grad():
        x = images.clone().requires_grad_(True)
        r = reward(x, TEXTS)
        r.sum().backward()
        return r.detach(), x.grad
    eager = score_and_grad()
    assert compile_blocks(reward, "aot_eager") > 0
    compiled = score_and_grad()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, compiled))


def check_bf16(reward, images, texts=TEXTS):
    """Held in bf16 and run without autocast (mixed_precision bf16-weights), a reward takes fp32 images in [-1, 1],
    scores them in fp32, near its fp32 scores, and passes a gradient to them."""
    x = images.clone().requires_grad_(True)
    scores = copy.deepcopy(reward).to(torch.bfloat16)(x, texts)
    scores.sum().backward()
    expected = reward(images, texts).detach()
    assert scores.dtype == torch.float32 and x.grad.abs().sum() > 0
    assert (scores.detach() - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("kind,suffix", [("clip", ".safetensors"), ("hps", ".pt")])
def test_open_clip_rewards_equal_open_clips_own_scoring(arch, kind, suffix, tmp_path):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, force_quick_gelu=kind == "clip")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":  # HPS ships a torch file with the weights under 'state_dict'
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file
        save_file(state, path)
    reward = load_real_reward(kind, path, arch=arch)
    for size, tol in [(32, 1e-5), (48, 2e-2)]:  # the model's size; a resize (PIL's bicubic vs torch's, antialiased)
        images = uint8_images(size)
        assert torch.allclose(reward(images, TEXTS), reference_open_clip(model.eval(), preprocess, images, TEXTS),
                              atol=tol)
    images = uint8_images(48).requires_grad_(True)
    reward(images, TEXTS).sum().backward()
    assert images.grad.abs().sum() > 0
    check_bf16(reward, uint8_images(48))
    check_compiled_blocks(reward, uint8_images(48))


def test_pickscore_equals_its_processor_and_scale(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                         vocab_size=80, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_clip_tokenizer())
    model.save_pretrained(tmp_path / "pick", safe_serialization=True)
    processor.save_pretrained(tmp_path / "pick")
    reward = load_real_reward("pick", tmp_path / "pick")
    images = uint8_images(32)
    with torch.no_grad():
        inputs = processor(images=pil(images), text=TEXTS, padding="max_length", truncation=True, return_tensors="pt")
        img = projected(model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = projected(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(reward(images, TEXTS), expected, atol=1e-4)
    check_bf16(reward, uint8_images(48))
    check_compiled_blocks(reward, uint8_images(48))


def test_laion_aesthetic_loads_the_released_head_layout_on_openai_clip_s_activation(arch, tmp_path):
    """The predictor's CLIP ViT-L/14 is OpenAI's, whose MLPs use QuickGELU (open_clip only warns when a model is
    built with GELU for it): the embeddings, and so the scores, are those of a QuickGELU CLIP with these weights."""
    torch.manual_seed(0)
    clip = open_clip.create_model(arch, force_quick_gelu=True).eval()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    head = AestheticMLP(32)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")  # the layout of sac+logos+ava1-l14-linearMSE.pth
    reward = load_real_reward("aesthetic", tmp_path / "aesthetic.pth", arch=arch,
                              clip_checkpoint=tmp_path / "clip.safetensors")
    assert isinstance(reward.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    images = uint8_images(32)
    with torch.no_grad():
        expected = head.eval()(torch.nn.functional.normalize(clip.encode_image(reward.preprocess(images)),
                                                             dim=-1)).squeeze(-1)
    assert torch.allclose(reward(images), expected, atol=1e-6) and reward(images).shape == (2,)
    check_bf16(reward, uint8_images(48), None)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_reward_checkpoints_never_unpickle_code(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="reward checkpoint .*missing.pt does not exist"):
        read_state_dict(tmp_path / "missing.pt")
