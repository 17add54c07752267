r"""Convert MIMIC-CXR-JPG + Chest ImaGenome into ArrayRecord triple shards (resumable, multi-process).

  python -m launch.convert_mimic --mimic_root=/data/mimic-cxr-jpg/2.0.0 \
      --imagenome_root=/data/chest-imagenome/1.0.0 --out=/data/triples/mimic_imagenome \
      --image_size=512 --format=png --workers=16

Rerunning the same command finishes an interrupted conversion: shards listed in
<out>/manifest.json whose checksum still matches are skipped. Prints one progress line per shard
(with an ETA) on stderr, then a summary of what was written and skipped, and why; the summary is
also kept in <out>/dataset_info.json. `--strict` stops at the first bad input, naming the file.
`--tfds_dir` additionally prepares the TFDS copy (`tfds.data_source('mimic_imagenome_triples',
data_dir=<tfds_dir>)`).
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mimic_root", required=True, help="MIMIC-CXR-JPG root (holds files/ and the metadata CSV)")
  p.add_argument("--imagenome_root", required=True, help="Chest ImaGenome root (holds silver_dataset/)")
  p.add_argument("--reports_root", default="",
                 help="MIMIC-CXR reports root (holds files/p10/...txt); default <mimic_root>/mimic-cxr-reports")
  p.add_argument("--out", required=True, help="output folder for shards, manifest.json and dataset_info.json")
  p.add_argument("--image_size", type=int, default=512, help="longer side of the stored image, pixels")
  p.add_argument("--format", choices=("png", "jpeg"), default="png", help="stored image encoding")
  p.add_argument("--pad", action="store_true", help="pad stored images to image_size squares (default: keep aspect)")
  p.add_argument("--workers", type=int, default=1, help="processes converting shards in parallel")
  p.add_argument("--shard_size", type=int, default=1000, help="studies per shard")
  p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
  p.add_argument("--tfds_dir", default="", help="also prepare the TFDS dataset into this folder")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from avlm_jax import fs
  from data_pipelines import schema
  from data_pipelines.mimic import bad_input, convert, layout

  try:
    opts = convert.Options(image_size=args.image_size, fmt=args.format, pad=args.pad,
                           shard_size=args.shard_size, strict=args.strict)
    # --out=gs://…: converted in a local folder named after the URL (a rerun resumes there),
    # uploaded when complete.
    with fs.staged_dir(args.out, last=(schema.INFO_FILE,), resumable=True) as local:
      convert.convert(layout.Roots(args.mimic_root, args.imagenome_root, args.reports_root), local, opts,
                      workers=args.workers)
      if args.tfds_dir:
        from data_pipelines.mimic import tfds_builder

        path = tfds_builder.prepare(local, args.tfds_dir)
        print(f"TFDS dataset prepared in {path}", file=sys.stderr)
  except (bad_input.ConversionError, ValueError, fs.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
