#!/usr/bin/env python3
"""Train the discrete VAE (image tokenizer) under DeepSpeed (the loop lives in dalle_ds.training).

    deepspeed scripts/train_dvae.py --deepspeed_config ds_configs/cpu_zero2_fp32.json \
        --preset dvae-tiny --output-dir runs/dvae --steps 500
"""

from dalle_ds.training import exit_process, main_dvae

if __name__ == "__main__":
    exit_process(main_dvae())
