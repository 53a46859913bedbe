#!/usr/bin/env python3
"""Pack a folder of images, subfolders included (with their VOC XML when given), into tar shards of N images each.

    bin/make_shards.py --images photos/ --output shards/ --shard-size 1000
    bin/make_shards.py --images DATA/images --annotations DATA/annotations --output shards/

Writes OUTPUT/shard-000000.tar ... (WebDataset layout: <key>.<ext> members, an image's
XML right after it; the key is the image's path below --images, siteA/cam1/img for
siteA/cam1/img.jpg, so that the predict jobs give a figure per subfolder as on the folder
itself), OUTPUT/index.json (shards with image and XML counts, bytes and sha256) and
OUTPUT/index.csv (one row per image: name, shard, bytes, sha256, XML). Symbolic links to
files and folders are followed. An XML pairs with the image at its path below --annotations
(siteA/img.xml with siteA/img.jpg). workflow.py --pred-images OUTPUT then runs one predict
job per shard. Skipped, counted in index.json and listed in OUTPUT/skipped.csv with the reason: files
that are not images, a second image with the key of another, both when an XML names a key two images share,
XML without an image, links to nothing or back into their own folder (a loop), names that are
not valid UTF-8, and a file reached twice through links. XML files beside the images are
packed only when --annotations names their folder (it may be the --images folder). --verify
re-reads an existing folder's shards against its index.
Exit 0 on success, 2 on bad input (one line naming the file), 1 on a bug.
"""

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from utils import defaults as D
from utils.cli import positive_int, print_skipped, run_job
from utils.data.shards import (INDEX_JSON, SKIPPED_CSV, collect_images, read_index, source_signature, verify,
                               write_shards)
from utils.errors import InputError


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of images (its subfolders too)")
    parser.add_argument("--annotations", default=None,
                        help="folder of VOC XML files, paired by path and stem (optional)")
    parser.add_argument("--output", required=True, help="shard folder to write (or, with --verify, to check)")
    parser.add_argument("--shard-size", type=positive_int, default=D.DATA_SHARD_IMAGES,
                        help=f"images per shard (default: {D.DATA_SHARD_IMAGES})")
    parser.add_argument("--workers", type=positive_int, default=D.SHARD_WORKERS,
                        help=f"shards written at once (default: {D.SHARD_WORKERS})")
    parser.add_argument("--verify", action="store_true", help="check an existing shard folder's sha256 sums")
    return parser


def main(args) -> int:
    if args.verify:
        index = read_index(args.output)
        bad = verify(index, args.workers)
        if bad:
            raise InputError(f"{args.output}: {len(bad)} shard(s) differ from {INDEX_JSON}: {', '.join(bad)}")
        print(f"make_shards: {len(index.shards)} shards, {index.num_images} images, all match {INDEX_JSON}")
        return 0
    if not args.images:
        raise InputError("--images is required (or --verify)")
    started = time.perf_counter()
    items, skipped = collect_images(args.images, args.annotations, exclude=[args.output])
    if not items:  # nothing is written, so no skipped.csv lists them
        print_skipped(skipped, None)
        raise InputError(f"{args.images}: no images to pack into shards ({len(skipped)} files skipped, listed above)")
    print_skipped(skipped, str(Path(args.output) / SKIPPED_CSV))
    with tqdm(total=len(items), desc="shards", unit="img", file=sys.stderr, disable=None) as bar:
        index = write_shards(items, args.output, args.shard_size, args.workers, skipped, progress=bar.update,
                             extra={"source": str(args.images), "source_signature": source_signature(items)})
    with_xml = sum(shard.annotations for shard in index.shards)
    print(f"make_shards: {index.num_images} images ({with_xml} with XML) in {len(index.shards)} shards of "
          f"up to {args.shard_size} in {args.output}, {len(skipped)} skipped, {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
