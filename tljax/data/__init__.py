"""Data: sources → decode/cache → on-device augmentation → sharded batches."""
