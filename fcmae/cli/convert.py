"""Turn an FCMAE checkpoint (from fcmae-pretrain, any backend, or an official ConvNeXt-V2 FCMAE
checkpoint) into dense encoder weights. Decoder weights are dropped; the final norm and classifier
are absent (fine-tuning starts them fresh)."""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from ..convert import EXPORT_FOLDER_FILES, FORMATS, convert_state, is_export_folder, save_converted, verify
from ..weights import read_pretraining_weights
from . import NON_NEGATIVE, cli_main, new_parser

log = logging.getLogger("fcmae.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("fcmae-convert", __doc__)
    parser.add_argument("checkpoint", help="FCMAE checkpoint (.pth or .safetensors)")
    parser.add_argument("-o", "--output", required=True,
                        help="where to write the dense weights: NAME.pth (torch.save), NAME.safetensors, "
                             "or, with --format timm or transformers, a folder name without suffix "
                             "(model.safetensors + config.json, loadable by timm or transformers alone)")
    parser.add_argument("--format", choices=FORMATS, default="official",
                        help="official: {'model': state_dict} as the official repo and fcmae.create_model "
                             "load it; timm: a bare state_dict for timm.create_model(MODEL) (InternImage and RevCol: "
                             "the models importing fcmae registers with timm); transformers (ConvNeXt V1/V2): "
                             "transformers' ConvNextModel/ConvNextV2Model keys")
    parser.add_argument("--model", default=None, help="expected model name (inferred from shapes if omitted)")
    parser.add_argument("--verify", action="store_true",
                        help="run sparse and dense models on a random batch and compare (exit 1 above --tolerance)")
    parser.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-3, help="max abs difference allowed by --verify")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file, or a folder of an earlier timm/transformers export")
    return parser


def check_output(output: Path, checkpoint: Path, force: bool) -> None:
    """``-o`` may be replaced only with ``--force``, never when it is or holds the input, and a
    folder only when it is an earlier timm or transformers export: nothing else is ever deleted."""
    if not output.exists() and not output.is_symlink():
        return
    source = checkpoint.resolve()
    if output.resolve() == source or (output.is_dir() and source.is_relative_to(output.resolve())):
        raise FileExistsError(f"-o {output} is or holds the input checkpoint; write the dense weights elsewhere")
    if not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    if output.is_dir() and not is_export_folder(output):
        others = sorted(entry.name for entry in output.iterdir() if entry.name not in EXPORT_FOLDER_FILES)
        listed = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise FileExistsError(f"-o {output} is a folder holding files fcmae-convert did not write ({listed}); "
                              f"--force replaces only an earlier --format timm/transformers export: choose another -o")


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    check_output(output, Path(args.checkpoint), args.force)
    found = read_pretraining_weights(args.checkpoint, "fcmae-convert", args.model)
    sparse_state = found.state
    dense_state, model_name = convert_state(sparse_state, found.model_name, args.format)
    max_diff = None
    if args.verify:
        max_diff = verify(sparse_state, dense_state, model_name, args.format)
        log.info(f"verify: max abs difference encoder vs dense model = {max_diff:.3g} (tolerance {args.tolerance:g})")
        if not max_diff <= args.tolerance:   # NaN fails too
            log.error(f"fcmae-convert: error: verification failed ({max_diff:.3g} > {args.tolerance:g}); "
                      f"nothing written")
            return 1
    written = save_converted(dense_state, model_name, args.format, output, found.input_size or 224)
    log.info(f"wrote {model_name} encoder weights ({len(dense_state)} tensors) to {output}: {written}")
    return 0


main = partial(cli_main, build_parser, run)   # main(argv=None): parse, run, exit with its code


if __name__ == "__main__":
    main()
