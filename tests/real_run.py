"""Launched by tests/test_families.py with torchrun: `python -m dmdr.real` with the tests' tiny open_clip
architecture registered in every process.

    python -m torch.distributed.run --nproc_per_node N tests/real_run.py CONFIG_DIR [dmdr.real arguments]
    accelerate launch --config_file configs/accelerate/{fsdp,deepspeed}.yaml --num_processes N tests/real_run.py ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tiny import deepspeed_on_cpu, fsdp_on_cpu, register_tiny_open_clip  # noqa: E402

from dmdr import real  # noqa: E402

if __name__ == "__main__":
    register_tiny_open_clip(Path(sys.argv[1]))
    fsdp_on_cpu()
    deepspeed_on_cpu()
    real.main(sys.argv[2:])
