#!/usr/bin/env python3
"""Upload a pipeline folder (e.g. runs/dalle/final) to the Hugging Face Hub, single-file or sharded weights.

    python scripts/push_to_hub.py runs/dalle/final --repo-id you/dalle-shapes [--private]
        [--revision main] [--commit-message "..."] [--dry-run]

``--dry-run`` lists what would be uploaded and its size, and touches no network. Without a token
(``huggingface-cli login`` or ``HF_TOKEN``) it stops with a message before doing any work.
"""

import argparse
import sys
from pathlib import Path

from dalle_ds.inference.hub import upload_plan
from dalle_ds.inference.serialization import weight_files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default="Upload dalle-ds pipeline")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    folder = Path(args.folder)
    missing = [n for n in ("config.json", "tokenizer.json", "dvae/config.json") if not (folder / n).is_file()]
    for weights in (folder, folder / "dvae"):  # model.safetensors, or an index and every shard it names
        try:
            weight_files(weights)
        except (OSError, ValueError) as err:
            missing.append(str(err))
    if missing:
        print(f"error: {folder} is not a pipeline folder: missing {missing}", file=sys.stderr)
        return 2
    plan = upload_plan(folder)
    if args.dry_run:
        for name, size in plan:
            print(f"{size:>14,d}  {name}")
        total = sum(size for _, size in plan)
        print(f"{total:>14,d}  total, {len(plan)} files -> {args.repo_id}"
              f"{'@' + args.revision if args.revision else ''} (dry run: nothing uploaded)")  # fmt: skip
        return 0
    from huggingface_hub import HfApi, get_token

    if not get_token():
        print("error: no Hugging Face token: run `huggingface-cli login` or set HF_TOKEN", file=sys.stderr)
        return 2
    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        if args.revision:
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder), repo_id=args.repo_id, revision=args.revision, commit_message=args.commit_message
        )
    except Exception as err:  # network, auth, permissions: say which and stop
        print(f"error: upload to {args.repo_id} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"uploaded {len(plan)} files to {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
