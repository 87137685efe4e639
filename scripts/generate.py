#!/usr/bin/env python3
"""Sample images for a caption from a trained pipeline; optionally rerank with CLIP (the paper's N -> k).

    python scripts/generate.py "a red circle at the top left" --checkpoint runs/dalle/final \\
        --num-candidates 64 --top-k-images 8 --clip openai/clip-vit-base-patch32 --out grid.png

``--checkpoint`` is a pipeline folder (transformer, tokenizer.json, dvae/), as the DALL-E trainer
exports it. ``--clip`` is a local folder or hub id of a ``transformers`` CLIP model with its
processor; without it the first ``--top-k-images`` samples are kept. ``--prime-image`` with
``--prime-rows R`` conditions every sample on the top R rows of that image's codes (the paper's
image-to-image completions). Writes the grid PNG and ``<out>.json`` (caption, settings, scores).

A pipeline larger than one device: ``--device-map auto|balanced|balanced_low_0|sequential`` builds
the transformer with empty weights and has ``accelerate`` place its blocks on the GPUs, the CPU and
(with ``--offload-folder``) disk within ``--max-memory``, e.g. for ``dalle-12b`` in bf16 (24 GB):

    python scripts/generate.py "a red circle" --checkpoint hub-export/ --dtype bf16 \
        --device-map balanced --max-memory 0=14GiB,1=14GiB,cpu=64GiB --offload-folder /scratch/offload
"""

import argparse
import json
from pathlib import Path

import torch

from dalle_ds.inference.big_model import add_loading_args, load_pipeline_from_args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("caption")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--num-candidates", type=int, default=64)
    p.add_argument("--top-k-images", type=int, default=8)
    p.add_argument("--clip", default=None, help="CLIP model folder or hub id for reranking")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely codes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance (needs --caption-dropout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prime-image", default=None)
    p.add_argument("--prime-rows", type=int, default=0)
    p.add_argument("--cache", choices=["full", "bounded"], default="full", help="KV cache: every position or per kind")
    add_loading_args(p)
    args = p.parse_args(argv)

    from dalle_ds.inference.generation import rerank, sample_images
    from dalle_ds.utils.images import save_grid

    model, tokenizer = load_pipeline_from_args(p, args)
    prime = None
    if args.prime_image:
        import numpy as np
        from PIL import Image

        from dalle_ds.data import paper_crop, to_rgb
        from dalle_ds.utils.images import as_float_image

        size = model.dvae.config.image_size
        img = paper_crop(to_rgb(Image.open(args.prime_image)), size, None)
        x = as_float_image(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].to(args.device))
        with torch.no_grad():
            prime = model.dvae.encode(x).reshape(-1)[: args.prime_rows * model.config.image_grid]
    images, _ = sample_images(
        model,
        tokenizer,
        args.caption,
        args.num_candidates,
        batch_size=args.batch_size,
        seed=args.seed,
        prime=prime,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        cache=args.cache,
        cond_scale=args.cond_scale,
    )
    k = min(args.top_k_images, args.num_candidates)
    settings = "num_candidates top_k top_p temperature seed prime_rows dtype cache device_map cond_scale".split()
    record = {"caption": args.caption, "checkpoint": args.checkpoint, **{a: getattr(args, a) for a in settings}}
    if args.clip:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        clip = CLIPModel.from_pretrained(args.clip).to(args.device).eval()
        processor, clip_tok = CLIPImageProcessor.from_pretrained(args.clip), AutoTokenizer.from_pretrained(args.clip)
        images, order, scores = rerank(images, args.caption, k, clip, processor, clip_tok)
        record.update(kept=order.tolist(), clip_scores=scores.tolist(), reranked_by=args.clip)
    else:
        images = images[:k]
        record.update(kept=list(range(k)))
    out = save_grid(images, args.out, nrow=min(k, 8))
    Path(str(out) + ".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({k} of {args.num_candidates} samples{', reranked by CLIP' if args.clip else ''})")


if __name__ == "__main__":
    main()
