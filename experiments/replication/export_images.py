r"""Dumps the exact images tljax trains and evaluates on, for the PyTorch side of the replication.

Runs in the main venv and uses tljax's own resolution of the recipe: `components.preprocessing`
(with the shipped Lite0 weights' metadata, as a training run gets it) and `components.load_data`,
i.e. `tljax.data.load_splits` with the config's data block and the run seed (which draws the
few-shot train set; val/test are carved by data.split_seed). Writes uint8 caches at tljax's load
size (146 px for a 128 px input: Lite's resize = input + 32/224 of it, then tljax centre-crops
input/resize of the cache at eval time) plus labels, ids and the preprocessing spec:

  python experiments/replication/export_images.py --seed=0 --out=/tmp/repl/data_s0.npz
  # optional: --config=experiments/replication/tljax_lite0.py (the default)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import numpy as np

from tljax import components
from tljax.porting.efficientnet_lite import preprocessing_for

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(path: str, arg: str = ''):
  spec = importlib.util.spec_from_file_location('_repl_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seed', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--config', default=os.path.join(HERE, 'tljax_lite0.py'))
  args = parser.parse_args()
  config = load_config(args.config)
  with config.unlocked():
    config.seed = args.seed
  # What `components.pretrained_weights` returns as metadata for the shipped Lite0 .pth.
  meta = {'preprocessing': preprocessing_for(config.model.name).to_json()}
  pp = components.preprocessing(config, meta)
  splits = components.load_data(config, pp)
  out = {'preprocessing': np.asarray(json.dumps(pp.to_json())),
         'load_size': np.asarray(components.load_size(config, pp)),
         'class_names': np.asarray(list(splits['train'].class_names))}
  for name, split in splits.items():
    out[f'{name}_images'] = np.asarray(split.images, np.uint8)
    out[f'{name}_labels'] = np.asarray(split.labels, np.int64)
    out[f'{name}_ids'] = np.asarray(list(split.ids))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(json.dumps({'out': args.out, 'seed': args.seed, 'preprocessing': pp.to_json(),
                    **{f'{k}_n': len(s) for k, s in splits.items()},
                    'image_shape': list(splits['train'].images.shape[1:])}))


if __name__ == '__main__':
  main()
