"""Pack ternary checkpoints into self-contained deployment files and tabulate what they cost on disk.

For each checkpoint (default: every checkpoints/*.pth holding a ternary layer; FP ones are skipped) this
writes <stem>.2bit.tern, <stem>.base3.tern and <stem>.entropy.tern next to it (format: docs/deployment_format.md;
a rerun with other flags overwrites them, and the manifest records the flags), with --onnx also <stem>.onnx,
then results/deployment.csv and .json: per layer and total, weights and bytes as FP32, 2-bit, base-3 and
entropy-coded, the order-0 entropy bound and the entropy code's gap to it, plus the real file sizes, the
checkpoint's own size and an FP32 state_dict's size for contrast.

--verify loads each file alone (the ONNX model in onnxruntime), runs the 10k MNIST test images and requires
the same predictions as the checkpoint's ternary model (quant.export.rebuild_model); any difference exits 1.
Verification runs on CPU.

Example:
    python deployment_compression.py --verify --onnx --data-dir ../shared/mnist
"""
import argparse
import sys
from pathlib import Path

from quant.cli import ArgumentParser, add_data_args, run_main, seed_everything
from quant.data import load_mnist
from quant.deployment import pack_and_verify
from quant.errors import QuantError
from quant.packing import ENCODINGS
from quant.results import format_table

COLUMNS = [("layer", "layer", ""), ("weights", "weights", "d"), ("fp32_bytes", "FP32 B", "d"),
           ("bytes_2bit", "2-bit B", "d"), ("bytes_base3", "base-3 B", "d"), ("bytes_entropy", "entropy B", "d"),
           ("order0_bytes", "order-0 B", ".0f"), ("gap_entropy", "gap B", "+.0f"),
           ("bits_per_weight_entropy", "bit/w", ".3f"), ("zero_fraction", "zero", ".3f"),
           ("compression_entropy", "x entropy", ".1f")]
FORMATS = (*ENCODINGS, "onnx")


def show(summary: dict) -> None:
    files = ", ".join(f"{f} {summary[f'file_bytes_{f}']:,} B" for f in FORMATS if f"file_bytes_{f}" in summary)
    print(f"\n{summary['checkpoint']} ({summary['mode']}; checkpoint {summary['checkpoint_bytes']:,} B, "
          f"FP32 state_dict {summary['fp32_state_dict_bytes']:,} B) -> {files}")
    print(format_table(summary["layers"], COLUMNS))
    if "test_acc_checkpoint" in summary:
        print(f"test accuracy: checkpoint {summary['test_acc_checkpoint']:.2f}%, " + ", ".join(
            f"{f} {summary[f'test_acc_{f}']:.2f}% ({summary[f'mismatches_{f}']} prediction(s) differ)"
            for f in FORMATS if f"test_acc_{f}" in summary))


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", type=Path, default=None,
                        help="checkpoint to pack; repeatable (default: every checkpoints/*.pth)")
    parser.add_argument("--encoding", choices=(*ENCODINGS, "all", "both"), default="all",
                        help="2bit (4 codes/byte), base3 (5 codes/byte), entropy (context model + rANS) or all "
                             "(default: all; 'both' is an older spelling of all)")
    parser.add_argument("--no-fold-bn", action="store_true", help="store BatchNorm as is (default: fold it)")
    parser.add_argument("--fp16", action="store_true",
                        help="biases/BN/FP-kept weights as fp16; scales stay fp32 (default: fp32)")
    parser.add_argument("--onnx", action="store_true", help="also write <stem>.onnx (int8 codes, QDQ)")
    parser.add_argument("--verify", action="store_true", help="check each file's MNIST test predictions")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="output folder (default: results)")
    add_data_args(parser)
    args = parser.parse_args()
    if args.device == "cuda":
        parser.error("--device cuda: deployment files are verified on CPU")
    seed_everything(args.seed)
    paths = args.checkpoint or sorted(Path("checkpoints").glob("*.pth"))
    if not paths:
        raise QuantError("no checkpoints/*.pth found; train one with train.py or pass --checkpoint PATH")
    encodings = tuple(ENCODINGS) if args.encoding in ("all", "both") else (args.encoding,)
    mnist = load_mnist(args.data_dir, test_only=True, verify_checksum=not args.skip_checksum) if args.verify else None
    # a prediction mismatch raises PackError (exit 1) after deployment.csv / .json are written
    result = pack_and_verify(paths, encodings, mnist, onnx=args.onnx, fold_bn=not args.no_fold_bn,
                             float_dtype="fp16" if args.fp16 else "fp32", results_dir=args.results_dir,
                             command=" ".join(sys.argv), show=show)
    for s in result["not_packed"]:
        print(s["note"])
    if not result["checkpoints"]:
        raise QuantError("none of the checkpoints has a ternary layer; nothing to pack")
    print(f"\nwrote {args.results_dir / 'deployment.csv'} and {args.results_dir / 'deployment.json'}")


if __name__ == "__main__":
    run_main(main)
