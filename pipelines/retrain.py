"""Stage `retrain`: the train stage again, on train + pseudo-labelled test images (round 1 by default; the Prefect
flow passes each round's --pseudo and --out-root)."""

from pipelines.train import main

if __name__ == "__main__":
    main(round_=1)
