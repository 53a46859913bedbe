#!/usr/bin/env python3
"""Write the built-in synthetic face-mask data set: DIR/images/*.jpg and DIR/annotations/*.xml (VOC).

Drawn faces wear a mask over nose and mouth (with_mask), over mouth or chin only
(mask_weared_incorrect) or none (without_mask). The same seed gives the same files.
Exit 0 on success, 2 on a bad flag value (one line), 1 on a bug.
"""

import argparse
import sys
from pathlib import Path

from utils import defaults as D
from utils.cli import int_at_least, positive_int, random_seed, run_job
from utils.data.sample_data import make_sample_dataset
from utils.provenance import write_run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sample"),
                        help="output folder; images/ and annotations/ are created inside (default: data/sample)")
    parser.add_argument("--num-images", type=int, default=D.SAMPLE_IMAGES,
                        help=f"number of images to draw (default: {D.SAMPLE_IMAGES})")
    parser.add_argument("--seed", type=random_seed, default=D.SEED,
                        help=f"random seed; the same seed gives the same files (default: {D.SEED})")
    parser.add_argument("--image-size", type=int_at_least(32), nargs=2, metavar=("W", "H"), default=D.SAMPLE_IMAGE_SIZE,
                        help="image width and height in pixels (default: {} {})".format(*D.SAMPLE_IMAGE_SIZE))
    parser.add_argument("--min-faces", type=positive_int, default=D.SAMPLE_FACES[0],
                        help=f"fewest faces per image (default: {D.SAMPLE_FACES[0]})")
    parser.add_argument("--max-faces", type=positive_int, default=D.SAMPLE_FACES[1],
                        help=f"most faces per image (default: {D.SAMPLE_FACES[1]})")
    return parser


def main(args) -> int:
    summary = make_sample_dataset(args.out, num_images=args.num_images, seed=args.seed,
                                  image_size=tuple(args.image_size), min_faces=args.min_faces,
                                  max_faces=args.max_faces)
    # A generator has no inputs: the parameters alone determine the files.
    write_run_record(Path(args.out) / "run_record.json", "make_sample_data", vars(args))
    objects = ", ".join(f"{name} {count}" for name, count in summary["objects"].items())
    print(f"wrote {summary['images']} images ({args.image_size[0]}x{args.image_size[1]}) to {summary['images_dir']} "
          f"and their VOC files to {summary['annotations_dir']}; objects: {objects}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
