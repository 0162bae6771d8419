"""Launched by tests/test_distill_loop.py with torchrun: a few steps of the one training loop on tiny models at a
global batch of 4, in however many processes torchrun starts; the main process saves the generator's weights.

    python -m torch.distributed.run --nproc_per_node N tests/ddp_train.py OUT.safetensors '{overrides}' [CHECKPOINT]
    accelerate launch --config_file configs/accelerate/{fsdp,deepspeed}.yaml --num_processes N tests/ddp_train.py ...
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dmdr.distill import train  # noqa: E402
from tiny import deepspeed_on_cpu, fsdp_on_cpu, tiny_clip, tiny_models  # noqa: E402

PROMPTS = ["a photo of a circle", "a photo of two squares", "a photo of a red triangle", "a blue square"]

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    checkpoint = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    fsdp_on_cpu()
    deepspeed_on_cpu()
    cfg, _, models = tiny_models(tiny_clip(), "unet", overrides)
    computed_in = set()  # the dtypes the generator's layers compute in, printed for the tests
    for layer in models.generator.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            layer.register_forward_pre_hook(lambda _, args: computed_in.add(str(args[0].dtype)))
    rows = train(cfg, models, PROMPTS, seed=0, checkpoint_dir=checkpoint)
    state = PartialState()
    if state.is_main_process:
        print("generator computed in", " ".join(sorted(computed_in)))
        save_file({k: v.contiguous() for k, v in models.generator.state_dict().items()}, out)
        out.with_suffix(".json").write_text(json.dumps(rows))
    state.wait_for_everyone()  # as dmdr.real: no process group left to the interpreter's teardown
    state.destroy_process_group()
