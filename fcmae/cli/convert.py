"""``fcmae-convert``: sparse FCMAE weights → dense ConvNeXt V2 weights for fine-tuning."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import checkpoint as ckpt
from ..convert import FORMATS, convert_state, verify
from . import run_or_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae-convert",
        description="Turn an FCMAE checkpoint (from fcmae-pretrain, any backend, or an official "
                    "ConvNeXt-V2 FCMAE checkpoint) into dense encoder weights. Decoder weights are "
                    "dropped; the final norm and classifier are absent (fine-tuning starts them fresh).")
    parser.add_argument("checkpoint", help="FCMAE checkpoint (.pth)")
    parser.add_argument("-o", "--output", required=True, help="where to write the dense weights")
    parser.add_argument("--format", choices=FORMATS, default="official",
                        help="official: {'model': state_dict} as the official repo and fcmae.create_model "
                             "load it; timm: a bare state_dict for timm.create_model('convnextv2_*')")
    parser.add_argument("--model", default=None, help="expected model name (inferred from shapes if omitted)")
    parser.add_argument("--verify", action="store_true",
                        help="run sparse and dense models on a random batch and compare (exit 1 above --tolerance)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs difference allowed by --verify")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return parser


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    source = ckpt.load_checkpoint(args.checkpoint)
    sparse_state = ckpt.state_dict_of(source)
    dense_state, model_name = convert_state(sparse_state, args.model, args.format)
    max_diff = None
    if args.verify:
        max_diff = verify(sparse_state, dense_state, model_name, args.format)
        print(f"verify: max abs difference encoder vs dense model = {max_diff:.3g} (tolerance {args.tolerance:g})")
        if max_diff > args.tolerance:
            print(f"fcmae-convert: error: verification failed ({max_diff:.3g} > {args.tolerance:g}); "
                  f"nothing written", file=sys.stderr)
            return 1
    payload = dense_state if args.format == "timm" else {
        "model": dense_state, "model_name": model_name, "format": "official-dense"}
    ckpt.atomic_save(payload, output)
    print(f"wrote {args.format} {model_name} encoder weights ({len(dense_state)} tensors) to {output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = run_or_exit("fcmae-convert", lambda: run(args),
                       (ckpt.CheckpointError, ValueError, FileExistsError, OSError))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
