#!/usr/bin/env python3
"""Train or fine-tune a VQGAN image tokenizer under DeepSpeed (the loop lives in dalle_ds.training).

    deepspeed scripts/train_vqgan.py --deepspeed_config ds_configs/cpu_zero2_fp32.json \
        --preset vqgan-tiny --output-dir runs/vqgan --steps 500
    deepspeed scripts/train_vqgan.py ... --preset vqgan-f16-16384 --init-from vqgan-f16-16384/ \
        --perceptual-weights last.ckpt     # fine-tune a converted taming model, its LPIPS from its .ckpt
"""

from dalle_ds.training import exit_process, main_vqgan

if __name__ == "__main__":
    exit_process(main_vqgan())
