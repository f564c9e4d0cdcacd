"""Command line: `python -m jaxlrp demo [--out DIR] [--epochs N] [--samples N] [--evaluate N] [--seed N]`."""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxlrp", description="jaxlrp: LRP for JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a CNN on bundled digits and write LRP heatmaps")
    demo.add_argument("--out", default="jaxlrp-demo", help="output folder (default: ./jaxlrp-demo)")
    demo.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    demo.add_argument("--samples", type=int, default=8, help="test digits to explain (default: 8)")
    demo.add_argument("--evaluate", type=int, default=0, help="test digits for pixel flipping (default: all)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from jaxlrp import demo as demo_module

    demo_module.run(args.out, epochs=args.epochs, samples=args.samples, evaluate_digits=args.evaluate, seed=args.seed)


if __name__ == "__main__":
    main()
