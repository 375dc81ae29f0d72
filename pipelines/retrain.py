"""Stage `retrain`: the train stage again, on train + pseudo-labelled test images (round 1)."""

from pipelines.train import main

if __name__ == "__main__":
    main(round_=1)
