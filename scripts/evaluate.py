#!/usr/bin/env python3
"""Evaluate a trained pipeline (and/or an image tokenizer) and write the numbers as JSON.

    python scripts/evaluate.py --checkpoint runs/dalle/final --holdout runs/dalle/holdout.json \\
        [--data synthetic|<stream>] [--num 512] [--per-caption 4] [--top-k 32] [--clip MODEL] --out eval.json
    python scripts/evaluate.py --dvae runs/dvae/final --num 512 [--fid]  # the tokenizer alone (dVAE or VQGAN)
    python scripts/evaluate.py --checkpoint runs/dalle/final --data <stream of real pairs> --num 30000 \\
        --fid --clip-score [--candidates 512] [--clip-model openai/clip-vit-base-patch32] --out eval.json

- Image tokenizer (dVAE or VQGAN): reconstruction MSE / PSNR and codebook use (perplexity, share
  used, dead codes) on ``--num`` images of ``--data``; with ``--fid`` also its rFID (the FID of its
  reconstructions against the images), with or without ``--checkpoint``.
- Transformer: validation loss, split into text and image, on the same images.
- Synthetic set: caption accuracy of generated images (colour, shape, position and all three, read
  back by the set's checker) for the held-out captions of ``--holdout`` (the trainer writes
  holdout.json), else for every combination; ``--clip``: mean CLIP score of those images.
- ``--fid`` / ``--clip-score`` (any ``--data``): one sample per caption of the first ``--num`` pairs
  (``--candidates N``: the CLIP-best of N, the paper's reranking), FID against the real images
  (torchmetrics; the standard Inception, or ``--fid-feature-extractor module:callable``) and CLIP
  score against the captions, with the real images' CLIP score for reference ("generation").
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from dalle_ds.inference.big_model import add_loading_args, default_device, load_pipeline_from_args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="pipeline folder (transformer + tokenizer + dvae/)")
    p.add_argument("--dvae", default=None, help="an image tokenizer folder (dVAE or VQGAN), to evaluate it alone")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--num", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=12345, help="synthetic images not drawn in training (seed 0)")
    p.add_argument("--holdout", default=None, help="holdout.json (captions) from the DALL-E trainer")
    p.add_argument("--per-caption", type=int, default=4)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance (needs --caption-dropout)")
    p.add_argument("--clip-model", "--clip", dest="clip_model", help="CLIP folder or hub id (default: openai's B/32)")
    p.add_argument("--fid", action="store_true", help="FID of samples for --data's captions against its images, "
                   "and the tokenizer's rFID (its reconstructions against the images)")
    p.add_argument("--clip-score", action="store_true", help="CLIP score of those samples against their captions")
    p.add_argument("--candidates", type=int, default=1, help="samples per caption; the CLIP-best one is kept")
    p.add_argument("--fid-weights", default=None, help="a local copy of the FID Inception weights (offline)")
    p.add_argument("--fid-feature-extractor", default=None, help="module:callable returning an nn.Module")
    p.add_argument("--out", default=None)
    add_loading_args(p)
    args = p.parse_args(argv)
    if not (args.checkpoint or args.dvae):
        p.error("give --checkpoint and/or --dvae")
    scoring = (args.fid and args.checkpoint) or args.clip_score or args.candidates > 1
    if scoring and not args.checkpoint:
        p.error("--clip-score / --candidates need --checkpoint")
    if args.fid_weights and args.fid_feature_extractor:
        p.error("--fid-weights is for the standard Inception, not --fid-feature-extractor")

    from dalle_ds.inference import metrics

    fid = clip = None
    clip_name = args.clip_model or metrics.DEFAULT_CLIP_MODEL
    try:  # before the models load: a missing package or unreachable weights fail fast
        if args.fid:
            spec = args.fid_feature_extractor
            fid = metrics.fid_metric(metrics.load_feature_extractor(spec) if spec else None, args.fid_weights)
        if args.clip_score or args.candidates > 1:
            clip = metrics.clip_score_metric(clip_name)
    except metrics.MetricUnavailableError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        sys.exit(2)

    from dalle_ds.data.synthetic import ALL_COMBOS, SyntheticShapes, caption_of
    from dalle_ds.inference.evaluation import caption_accuracy, dvae_metrics, validation_loss
    from dalle_ds.inference.generation import clip_scores
    from dalle_ds.inference.serialization import load_dvae
    from dalle_ds.utils.images import as_float_image

    model = tokenizer = None
    if args.checkpoint:
        model, tokenizer = load_pipeline_from_args(p, args)
        dvae = model.dvae
    else:
        args.device = default_device(args.device)
        dvae = load_dvae(args.dvae, args.device)
    size = dvae.config.image_size
    for metric in (fid, clip):  # computed where the samples are made
        if metric is not None:
            metric.to(args.device)

    def batches():
        if args.data == "synthetic":
            data = SyntheticShapes(args.num, size, seed=args.seed)
            for start in range(0, args.num, args.batch_size):
                items = [data[i] for i in range(start, min(start + args.batch_size, args.num))]
                yield {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        else:
            from dalle_ds.data import DataConfig, StreamLoader

            cfg = DataConfig(args.data, image_size=size, augment=False, shuffle_buffer=1, drop_last=False)
            loader = StreamLoader(cfg, args.batch_size, epochs=1)
            taken = 0
            for batch in loader:
                if taken >= args.num:
                    break
                taken += len(batch["caption"])
                yield {"image": as_float_image(batch["image"]), "caption": batch["caption"]}

    sampling = {a: getattr(args, a) for a in ("top_k", "top_p", "temperature", "cond_scale")}
    result = {"dvae": dvae_metrics(dvae, (b["image"] for b in batches()), fid=fid)}
    if model is not None:
        result["validation"] = validation_loss(model, tokenizer, batches())
        if args.data == "synthetic":
            combos = list(ALL_COMBOS)
            if args.holdout:
                held = set(json.loads(Path(args.holdout).read_text()))
                combos = [c for c in ALL_COMBOS if caption_of(c) in held]
            scores, images, order = caption_accuracy(model, tokenizer, combos, args.per_caption, **sampling)
            result["caption_accuracy"] = {**scores, "captions": len(combos), "samples": len(order),
                                          "held_out": bool(args.holdout)}  # fmt: skip
            if args.clip_model:
                net = clip or metrics.clip_score_metric(args.clip_model)
                parts = net.model.clip, net.processor.image_processor, net.processor.tokenizer
                per = [clip_scores(images[i : i + 1], caption_of(c), *parts)[0] for i, c in enumerate(order)]
                result["clip_score"] = float(torch.stack(per).mean())
        if scoring:
            gen = metrics.generate_and_score(model, tokenizer, batches(), args.num, fid=fid, clip=clip,
                                             candidates=args.candidates, seed=args.seed, **sampling)  # fmt: skip
            gen["clip_model"] = clip_name if clip is not None else None
            gen["fid_features"] = (args.fid_feature_extractor or "inception-v3-compat-2048") if fid else None
            result["generation"] = gen
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
