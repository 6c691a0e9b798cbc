"""Data: sources → decode/cache → on-device augmentation → sharded batches.

`load_splits` returns decoded `Split`s (or `StreamingSplit`s over the cache
budget); `batching` turns them into pmap-shaped uint8 batches; `augment`
runs inside the jitted step and produces normalised float inputs.
"""

from tljax.data.config import default_augment_config, default_data_config
from tljax.data.sources import load_splits
from tljax.data.split import Split, summarize
from tljax.data.streaming import StreamingSplit

__all__ = ['load_splits', 'Split', 'StreamingSplit', 'default_data_config',
           'default_augment_config', 'summarize']
