"""Checkpoint files of other frameworks → Flax variables (`params`, `batch_stats`).

Converters are pure functions that never touch the network; see `catalog`
for official files and `tljax.port` for the command line.
"""


def from_torchvision(path_or_state_dict, arch, num_classes=1000, **kw):
  from tljax.porting import torchvision
  return torchvision.from_torchvision(path_or_state_dict, arch, num_classes=num_classes, **kw)


def from_keras(h5_path, arch, num_classes=1000, **kw):
  from tljax.porting import keras
  return keras.from_keras(h5_path, arch, num_classes=num_classes, **kw)


def from_efficientnet_lite(path_or_state_dict, arch='efficientnet_lite0', num_classes=1000, **kw):
  from tljax.porting import efficientnet_lite
  return efficientnet_lite.from_efficientnet_lite(path_or_state_dict, arch, num_classes=num_classes,
                                                  **kw)


def from_timm(path_or_dir, arch, num_classes=1000, **kw):
  from tljax.porting import timm
  return timm.from_timm(path_or_dir, arch, num_classes=num_classes, **kw)
