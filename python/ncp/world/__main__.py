"""``python -m ncp.world build [--out DIR] [--seed N] [--tiny] [--family sd15|sd3]``: build the world bundle
(``sd15``, the default: the shipped SD1.5 world; ``sd3``: the flow world, a small SD3 pipeline on the same
scenes, judge and captioner)."""
from __future__ import annotations

import argparse
import json
import time

from ncp.world import BUNDLE_DIR


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ncp.world", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pretrain the base model and make the preference data")
    b.add_argument("--out", default=str(BUNDLE_DIR), help=f"output folder (default: the shipped bundle, {BUNDLE_DIR})")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--family", choices=("sd15", "sd3"), default="sd15",
                   help="the base model: sd15 (a U-Net, the shipped world) or sd3 (an MM-DiT, the flow world)")
    b.add_argument("--tiny", action="store_true", help="toy sizes, seconds (for tests)")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps the build bit-reproducible)")
    b.add_argument("--keep-stages", action="store_true", help="keep the pretrained stages in OUT/.stages")
    b.add_argument("--reuse-stages", action="store_true",
                   help="load the stages kept in OUT/.stages instead of training them (implies --keep-stages)")
    b.add_argument("--data-only", action="store_true",
                   help="keep OUT/model and redo only the preference data and held-out statistics")
    args = parser.parse_args(argv)

    from ncp.world.build import build_world, default_config, tiny_config

    if args.family == "sd3" and args.out == str(BUNDLE_DIR):
        parser.error("--family sd3 needs --out: the shipped bundle folder holds the SD1.5 world")
    cfg = (tiny_config if args.tiny else default_config)(args.seed, args.family)
    cfg.threads = args.threads
    t0 = time.time()
    world = build_world(args.out, cfg, reuse_stages=args.reuse_stages, keep_stages=args.keep_stages,
                        data_only=args.data_only)
    print(json.dumps(world["stats"], indent=2))
    print(f"world built in {time.time() - t0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
