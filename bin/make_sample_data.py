#!/usr/bin/env python3
"""Write the built-in synthetic face-mask data set: DIR/images/*.jpg and DIR/annotations/*.xml (VOC).

Drawn faces wear a mask over nose and mouth (with_mask), over mouth or chin only
(mask_weared_incorrect) or none (without_mask). The same seed gives the same files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from utils.provenance import write_run_record  # noqa: E402
from utils.data.sample_data import make_sample_dataset  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/sample"),
                        help="output folder; images/ and annotations/ are created inside (default: data/sample)")
    parser.add_argument("--num-images", type=int, default=200, help="number of images to draw (default: 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives the same files (default: 0)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=(320, 240),
                        help="image width and height in pixels (default: 320 240)")
    parser.add_argument("--min-faces", type=int, default=1, help="fewest faces per image (default: 1)")
    parser.add_argument("--max-faces", type=int, default=6, help="most faces per image (default: 6)")
    return parser


def main(args) -> int:
    try:
        summary = make_sample_dataset(args.out, num_images=args.num_images, seed=args.seed,
                                      image_size=tuple(args.image_size), min_faces=args.min_faces,
                                      max_faces=args.max_faces)
    except ValueError as exc:
        print(f"make_sample_data: {exc}", file=sys.stderr)
        return 2
    # A generator has no inputs: the parameters alone determine the files.
    write_run_record(Path(args.out) / "run_record.json", "make_sample_data", vars(args))
    objects = ", ".join(f"{name} {count}" for name, count in summary["objects"].items())
    print(f"wrote {summary['images']} images ({args.image_size[0]}x{args.image_size[1]}) to {summary['images_dir']} "
          f"and their VOC files to {summary['annotations_dir']}; objects: {objects}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
