#!/usr/bin/env python3
"""Publish a trained early-exit experiment to the Hugging Face Hub.

Usage::

    python recipes/publish.py results/synthetic/conformer_ctc_ee/1234 --repo-id OWNER/NAME \\
        [--private] [--exist-ok] [--dry-run] [--out FOLDER] [--example AUDIO] \\
        [--license apache-2.0] [--language en] [--onnx]

Builds a Hub-ready folder (default ``<experiment>/hub``) from the experiment's
``inference/`` export, ``report.json`` and plot: the loadables, ``config.json``,
an example audio file and a model card with every exit's WER. The folder is
then loaded back with ``EarlyExitASR`` and with SpeechBrain's ``EncoderASR``
and the example transcribed (with ``--onnx``, the folder also gets ``onnx/``, the
ONNX export in fp32 and int8, loaded with the runtime and the example transcribed at
every exit: docs/deployment.md); nothing is uploaded if that fails. Without
``--dry-run`` the repository is created and the folder uploaded with
``huggingface_hub.HfApi``, with the token of ``HF_TOKEN`` or ``hf auth login``
(never printed). ``--dry-run`` makes no network call. See docs/publishing.md.
"""

import argparse
import logging
import os
import sys

from earlyexit_brain.files import NotOurFolderError
from earlyexit_brain.hub import (
    PublishError,
    build_hub_folder,
    check_repo_id,
    hub_token,
    upload_hub_folder,
    validate_hub_folder,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="experiment folder (output_folder of recipes/train.py)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--exist-ok", action="store_true", help="upload a new revision to a repository that already exists"
    )
    parser.add_argument("--dry-run", action="store_true", help="build and validate the folder; no network call")
    parser.add_argument("--out", default=None, help="where to build the folder (default <experiment>/hub)")
    parser.add_argument(
        "--example", default=None, help="audio file for the card and the validation (default: a test utterance)"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="add onnx/ (fp32 and int8, for the runtime without PyTorch: the experiment's "
        "recipes/export.py --int8 folder, or exported now) and validate it",
    )
    parser.add_argument("--license", default="apache-2.0", help="license id for the card")
    parser.add_argument("--language", default="en", help="language code for the card")
    parser.add_argument("--message", default=None, help="commit message")
    return parser.parse_args(argv)


def main(argv) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = args.out or os.path.join(args.experiment, "hub")
    try:
        check_repo_id(args.repo_id)
        api = None
        if not args.dry_run:
            from huggingface_hub import HfApi

            token = hub_token()
            if not token:
                raise PublishError(
                    "no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                    "(or use --dry-run to build the folder only)"
                )
            api = HfApi(token=token)
            if not args.exist_ok and api.repo_exists(args.repo_id, repo_type="model"):
                raise PublishError(
                    f"{args.repo_id} already exists on the Hub; pass --exist-ok to upload a new revision to it"
                )
        folder = build_hub_folder(
            args.experiment, out, args.repo_id, args.license, args.language, args.example, onnx=args.onnx
        )
        print(f"Built {folder}")
        texts = validate_hub_folder(folder)
        print(
            f"Validated: EarlyExitASR transcribes the example as {texts['earlyexit_brain']!r}; "
            f"EncoderASR (default exit) as {texts['encoder_asr']!r}"
        )
        if args.onnx:
            print(
                f"Validated onnx/: the runtime transcribes it as {texts['onnx_fp32']!r} (fp32), "
                f"{texts['onnx_int8']!r} (int8)"
            )
        if args.dry_run:
            print("Dry run: nothing uploaded.")
            return 0
        url = upload_hub_folder(
            folder, args.repo_id, private=args.private, exist_ok=args.exist_ok, api=api, message=args.message
        )
        print(f"Uploaded to https://huggingface.co/{args.repo_id} ({url})")
        return 0
    except (PublishError, NotOurFolderError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
