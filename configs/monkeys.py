r"""10 Monkey Species (seeds 000 and 004): one dataset, three models, chosen by `model=`.

Seed 000, transfer (the default model): ImageNet ResNet34, a new head on the frozen
trunk, then every layer.

  python -m tljax.port --source=torchvision --arch=resnet34 --download --output=weights/resnet34
  python -m tljax.main --config=configs/monkeys.py:model=resnet34 \
      --workdir=workdirs/monkeys_resnet34 --config.data.root=data/10-monkey-species

Seed 000, baseline: a small CNN trained from scratch.

  python -m tljax.main --config=configs/monkeys.py:model=cnn_scratch \
      --workdir=workdirs/monkeys_cnn --config.data.root=data/10-monkey-species

Seed 004: a frozen Keras MobileNet (v1), dense layers trained.

  python -m tljax.port --source=keras --arch=mobilenet_v1 --variant=notop --download \
      --output=weights/mobilenet_v1_notop
  python -m tljax.main --config=configs/monkeys.py:model=mobilenet_v1 \
      --workdir=workdirs/monkeys_mnv1 --config.data.root=data/10-monkey-species

Test mode (any model): `--config=configs/monkeys.py:model=cnn_scratch,tiny`.

Data: the Kaggle archive `10-monkey-species` unpacked under `data.root`
(`training/training/n0..n9`, `validation/validation/n0..n9`, `monkey_labels.txt`);
the validation folder is the test set both seeds report on. Batches of 16.

model=resnet34. Seed recipe (PyTorch): fc replaced by a 10-way Linear; phase 1 trains
it alone, phase 2 unfreezes every layer; Adam, lr 1e-5, batch 16, 100 epochs each.
Seed's results: 95.58% test accuracy after the head phase, 98.38% after fine-tuning.
Differences on purpose: the head phase runs the trunk's BatchNorm on its running
statistics (PyTorch's `model.train()` would update them although the convolutions are
frozen) and trains on 10 pre-drawn augmented views per image whose trunk features are
computed once (`cache_views=10`; set `--config.phases[0].cache_views=0` for fresh
augmentation every epoch, about 10x slower). Fine-tuning trains BatchNorm as the seed
did; `--config.phases[1].bn=frozen` gives the Keras recipe.

model=cnn_scratch. Seed recipe: Adam, lr 1e-5, 100 epochs, batch 16. Seed's result:
45.58% test accuracy — the number transfer learning (model=resnet34) is measured
against.

model=mobilenet_v1. Seed recipe: pretrained MobileNet with every weight frozen except
the new top, "Fully Connected (FC) or Dense Layers with a final output of 10". The seed
gives neither the layer widths nor the optimizer and reports no accuracy; the values
here follow the course notebook it comes from (global average pool → Dense(1024, relu)
→ Dense(1024, relu) → Dense(512, relu) → Dense(10, softmax); RMSprop 1e-3; 224x224;
rotation, flip augmentation; batch 16; 5 epochs). No seed number to reproduce: compare
with model=resnet34's head phase.
"""

import ml_collections

from tljax.config import base_config, config_args, finalize, phase


def _resnet34(c: ml_collections.ConfigDict) -> None:
  c.model.name = 'resnet34'
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/resnet34'
  c.phases = (
      phase('head', epochs=100, trainable='head', optimizer='adam', lr=1e-5, eps=1e-8,
            bn='frozen', cache_views=10),
      phase('fine_tune', epochs=100, trainable='all', optimizer='adam', lr=1e-5, eps=1e-8,
            bn='train'),
  )
  c.checkpoint.every_steps = 500


def _cnn_scratch(c: ml_collections.ConfigDict) -> None:
  c.model.name = 'simple_cnn'
  c.model.head.hidden = (256,)
  c.model.head.dropout = 0.5
  c.preprocessing = 'torchvision'
  c.phases = (phase('scratch', epochs=100, trainable='all', optimizer='adam', lr=1e-5, eps=1e-8,
                    bn='train'),)
  c.checkpoint.every_steps = 500


def _mobilenet_v1(c: ml_collections.ConfigDict) -> None:
  c.model.name = 'mobilenet_v1'
  c.model.head.update(dict(pool='avg', hidden=(1024, 1024, 512), activation='relu', dropout=0.0))
  c.pretrained.source = 'dir'
  c.pretrained.path = 'weights/mobilenet_v1_notop'
  c.input_size = 224
  c.augment.update(dict(random_resized_crop=False, flip=True, rotation=45.0))
  c.phases = (phase('head', epochs=5, trainable='head', optimizer='rmsprop', lr=1e-3,
                    momentum=0.0, bn='frozen'),)


MODELS = {'resnet34': _resnet34, 'cnn_scratch': _cnn_scratch, 'mobilenet_v1': _mobilenet_v1}
ARGS = dict(model=tuple(MODELS))


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = config_args(arg, **ARGS)
  c = base_config()
  c.data.update(dict(source='folder', root='data/10-monkey-species', train_split='training',
                     val_split='validation', label_file='monkey_labels.txt'))
  c.batch_size = 16
  MODELS[args['model']](c)
  return finalize(c, args)
