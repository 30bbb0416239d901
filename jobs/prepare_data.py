"""Convert COCO / ImageNet / an image folder (local or s3://) into robustfm shards.

    python jobs/prepare_data.py source.kind=imagenet source.root=/data/imagenet output=s3://bucket/imagenet-shards
    python jobs/prepare_data.py source.kind=image_folder source.root=./my_images output=data/shards shard_size=500

S3 credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role, ...); a non-AWS endpoint
from $AWS_ENDPOINT_URL or ``s3_endpoint_url=``. Rerunning the same command resumes and skips finished shards.
Ray starts inside ``run`` only after the source was listed, so a wrong root or layout fails at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from robustfm.config.cli import parse_job_config
from robustfm.data.config import PrepareConfig
from robustfm.data.sources import LayoutError


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_job_config(PrepareConfig, argv, "Convert a data set into robustfm shards")
    from robustfm.data.prepare import run

    try:
        summary = run(config)
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
