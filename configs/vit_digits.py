r"""Today's backbones on the digits: a timm ViT or ConvNeXt, head first, then the top blocks.

  python -m tljax.port --source=timm --arch=vit_small_patch16_224 --download \
      --output=weights/vit_small_patch16_224
  python -m tljax.main --config=configs/vit_digits.py --workdir=workdirs/vit_digits
  python -m tljax.main --config=configs/vit_digits.py:model=vit_base_patch16_224 \
      --workdir=workdirs/vit_b_digits      # after porting it to weights/vit_base_patch16_224
  python -m tljax.main --config=configs/vit_digits.py:model=convnext_tiny \
      --workdir=workdirs/convnext_digits

Test mode (a 3-block ViT or a small ConvNeXt on synthetic data, same phases):
`--config=configs/vit_digits.py:tiny`, `--config=configs/vit_digits.py:model=convnext_tiny,tiny`.

The weights come from the Hugging Face hub through timm's files (`--download`
needs the network and `pip install 'tljax[hub]'`; offline, the port command
names the two files to fetch by hand and the `--input=DIR` to give). The
preprocessing (mean/std, interpolation) is the file's own `pretrained_cfg`.

Recipe: the digits as in configs/default.py (10 training images per class);
inputs at 112 px, a 7x7 patch grid for ViT-S/16, whose position embedding is
resampled from the 14x14 it was trained with (bicubic, as timm does). Phase 1
trains a new linear head on cached features; phase 2 unfreezes the head and
the top 4 blocks with AdamW, warm-up and cosine decay, and layer-wise LR
decay 0.75 (each block's LR is the one above it x 0.75: the standard ViT
fine-tuning recipe). A block is a unit of `top:N` (`tljax.optim.backbone_blocks`): for
ViT-S/16 the patch embedding and the 12 transformer blocks (the last with the final norm);
for ConvNeXt-T the stem, the 3 downsampling layers and the 18 residual blocks.
"""

from tljax.config import base_config, config_args, finalize, phase

ARGS = dict(model=('vit_small_patch16_224', 'vit_base_patch16_224', 'convnext_tiny'))


def get_config(arg: str = ''):
  args = config_args(arg, **ARGS)
  c = base_config()
  c.model.name = args['model']
  c.pretrained.source = 'dir'
  c.pretrained.path = f'weights/{args["model"]}'
  c.input_size = 112
  c.data.source = 'digits'
  c.data.examples_per_class = 10
  c.data.val_fraction = 0.25
  c.data.test_fraction = 0.25
  c.augment.update(dict(flip=False, scale=(0.6, 1.0), ratio=(0.8, 1.25)))
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval.every_epochs = 5
  c.phases = (
      phase('head_only', epochs=20, trainable='head', optimizer='adam', lr=2e-3, augment=False),
      phase('top_blocks', epochs=10, trainable='head+top:4', optimizer='adamw', lr=2e-4,
            weight_decay=0.05, lr_decay=0.75, schedule='cosine', warmup_epochs=1),
  )
  return finalize(c, args)
