"""The support modules beneath the scripts: files written atomically, devices and precision, the
process group, images, labels and palettes, run-length encoding, plots, cutouts, augmentation,
pretrained encoders, checkpoints' file format, the Kaggle submission and the served model's queue.

They import only each other (and third-party packages), never the scripts or the modules at the
top level; tests/test_inference.py checks the order.
"""
