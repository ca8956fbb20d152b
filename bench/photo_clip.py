"""A 1920x1080 mp4v clip of a dataset's images, three per frame, for the camera-size benchmarks.

    .venv/bin/python bench/photo_clip.py --images runs/data-photo/val --out clip1080.mp4 [--frames 90]
        [--first-frame frame1080.png]

Each frame holds three of the images (sorted by name, taken in turn) scaled to 640x640 side by
side on grey (BGR 114), rows 220-859: a model trained on the dataset sees its objects at about
the scale it was trained on once the frame is letterboxed to 512 px, so it detects what a
trained model detects on a camera (docs/runtime.md uses the photograph set's val split,
``bench/photo_shapes.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT, TILE = 1920, 1080, 640


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="a folder of .jpg / .png images")
    parser.add_argument("--out", required=True, help="the .mp4 to write")
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--first-frame", help="also write the first frame here as a lossless image, as encoded "
                        "and decoded (bench/serve.py --image)")
    args = parser.parse_args()
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no .jpg or .png images in {args.images}")
    writer = cv2.VideoWriter(args.out, cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"cannot write {args.out}")
    top = (HEIGHT - TILE) // 2
    for k in range(args.frames):
        frame = np.full((HEIGHT, WIDTH, 3), 114, np.uint8)
        for j in range(WIDTH // TILE):
            image = cv2.imread(str(files[(3 * k + j) % len(files)]), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"cannot read {files[(3 * k + j) % len(files)]}")
            frame[top:top + TILE, TILE * j:TILE * (j + 1)] = cv2.resize(image, (TILE, TILE),
                                                                         interpolation=cv2.INTER_LINEAR)
        writer.write(frame)
    writer.release()
    if args.first_frame:
        capture = cv2.VideoCapture(args.out)
        ok, first = capture.read()
        capture.release()
        if not ok or not cv2.imwrite(args.first_frame, first):
            raise SystemExit(f"cannot write {args.first_frame}")
    print(f"wrote {args.out}: {args.frames} frames of {WIDTH}x{HEIGHT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
