"""The stages: one module per dvc.yaml stage (`python -m pipelines.<stage>`), each calling the segpipe library;
they know nothing of Prefect."""
