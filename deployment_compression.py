"""Pack ternary checkpoints into self-contained deployment files and tabulate what they cost on disk.

For each checkpoint (default: every checkpoints/*.pth holding a ternary layer; FP ones are skipped) this
writes <stem>.2bit.tern and <stem>.base3.tern next to it (format: quant/deploy_format.py; a rerun with other
flags overwrites them, and the manifest records the flags), then results/deployment.csv and .json: per
layer and total, weights and bytes as FP32, 2-bit, base-3 and at the entropy bound, plus the real file
sizes, the checkpoint's own size and an FP32 state_dict's size for contrast.

--verify loads each file alone, runs the 10k MNIST test images and requires the same predictions as the
checkpoint's ternary model (quant.export.rebuild_model); any difference exits 1. Verification runs on CPU.

Example:
    python deployment_compression.py --verify --data-dir ../shared/mnist
"""
import argparse
import sys
from pathlib import Path

from quant.cli import ArgumentParser, add_data_args, format_table, run_main, seed_everything
from quant.data import load_mnist
from quant.deployment import ENCODINGS, pack_checkpoint, write_results
COLUMNS = [("layer", "layer", ""), ("weights", "weights", "d"), ("fp32_bytes", "FP32 B", "d"),
           ("bytes_2bit", "2-bit B", "d"), ("bytes_base3", "base-3 B", "d"), ("entropy_bytes", "entropy B", ".0f"),
           ("zero_fraction", "zero", ".3f"), ("compression_2bit", "x 2-bit", ".1f"),
           ("compression_base3", "x base-3", ".1f")]


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", type=Path, default=None,
                        help="checkpoint to pack; repeatable (default: every checkpoints/*.pth)")
    parser.add_argument("--encoding", choices=(*ENCODINGS, "both"), default="both",
                        help="2bit (4 codes/byte), base3 (5 codes/byte) or both (default: both)")
    parser.add_argument("--no-fold-bn", action="store_true", help="store BatchNorm as is (default: fold it)")
    parser.add_argument("--fp16", action="store_true", help="biases/BN/FP-kept weights as fp16 (default: fp32)")
    parser.add_argument("--verify", action="store_true", help="check each file's MNIST test predictions")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="output folder (default: results)")
    add_data_args(parser)
    args = parser.parse_args()
    if args.device == "cuda":
        parser.error("--device cuda: deployment files are verified on CPU")
    seed_everything(args.seed)
    paths = args.checkpoint or sorted(Path("checkpoints").glob("*.pth"))
    if not paths:
        raise ValueError("no checkpoints/*.pth found; train one with train.py or pass --checkpoint PATH")
    encodings = ENCODINGS if args.encoding == "both" else (args.encoding,)
    mnist = load_mnist(args.data_dir, test_only=True, verify_checksum=not args.skip_checksum) if args.verify else None
    summaries = [pack_checkpoint(p, encodings, mnist, fold_bn=not args.no_fold_bn,
                                 float_dtype="fp16" if args.fp16 else "fp32") for p in paths]
    summaries, not_packed = [s for s in summaries if "layers" in s], [s for s in summaries if "layers" not in s]
    for s in not_packed:
        print(s["note"])
    if not summaries:
        raise ValueError("none of the checkpoints has a ternary layer; nothing to pack")
    for s in summaries:
        files = ", ".join(f"{s[f'file_{e}']} {s[f'file_bytes_{e}']:,} B" for e in encodings)
        print(f"\n{s['checkpoint']} ({s['mode']}; checkpoint {s['checkpoint_bytes']:,} B, "
              f"FP32 state_dict {s['fp32_state_dict_bytes']:,} B) -> {files}")
        print(format_table(s["layers"], COLUMNS))
        if args.verify:
            print("test accuracy: checkpoint {:.2f}%, ".format(s["test_acc_checkpoint"]) + ", ".join(
                f"{e} file {s[f'test_acc_{e}']:.2f}% ({s[f'mismatches_{e}']} prediction(s) differ)" for e in encodings))
    write_results(args.results_dir, summaries, not_packed, " ".join(sys.argv))
    print(f"\nwrote {args.results_dir / 'deployment.csv'} and {args.results_dir / 'deployment.json'}")
    differ = [f"{s['checkpoint']} {e}" for s in summaries for e in encodings if s.get(f"mismatches_{e}", 0)]
    if differ:
        print(f"error: packed predictions differ from the checkpoint's for {', '.join(differ)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
