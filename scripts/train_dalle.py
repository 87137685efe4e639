#!/usr/bin/env python3
"""Train the DALL-E transformer under DeepSpeed (the loop lives in dalle_ds.training).

    deepspeed [--hostfile hostfiles/H] scripts/train_dalle.py --deepspeed_config ds_configs/zero2_bf16.json \
        --preset dalle-tiny --dvae runs/dvae/final --output-dir runs/dalle --steps 1000
"""

from dalle_ds.training import exit_process, main_dalle

if __name__ == "__main__":
    exit_process(main_dalle())
