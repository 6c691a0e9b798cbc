"""Layer-wise LR decay (`phases[i].lr_decay`): each backbone block's LR is the next one's × d.

The multipliers are checked against the definition (head 1, last block d,
first block d ** n_blocks), and the updates they produce against the same
optimizer run without decay, scaled by hand per block: for Adam, AdamW (whose
decoupled decay must scale with the LR too) and SGD with momentum, over
several steps so the optimizer state is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tljax import config as tl_config
from tljax import models, optim
from tljax.config import phase

SIZE = 32


@pytest.fixture(scope='module')
def net():
  model = models.create('resnet_tiny', 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  blocks = optim.backbone_blocks(model, variables['params'], (1, SIZE, SIZE, 3))
  return model, variables['params'], blocks


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree), sep='/')


def test_scales_follow_block_depth(net):
  _, params, blocks = net
  labels = optim.param_labels(params, 'all', blocks)
  scales = _flat(optim.lr_scales(labels, 0.5, blocks))
  assert len(blocks) >= 3
  for k, s in scales.items():
    if k.startswith('head/'):
      assert s == 1.0, k
      continue
    module = k.split('/')[1]
    g = next(i for i, b in enumerate(blocks) if module in b)
    assert s == 0.5 ** (len(blocks) - g), (k, s)
  first = [k for k in scales if k.split('/')[1] == blocks[0][0]]
  last = [k for k in scales if k.split('/')[1] == blocks[-1][0]]
  assert {scales[k] for k in first} == {0.5 ** len(blocks)}
  assert {scales[k] for k in last} == {0.5}


def test_decay_one_is_all_ones_and_needs_no_blocks(net):
  _, params, _ = net
  labels = optim.param_labels(params, 'head', None)
  assert set(_flat(optim.lr_scales(labels, 1.0, None)).values()) == {1.0}
  with pytest.raises(ValueError, match='block order'):
    optim.lr_scales(labels, 0.75, None)


@pytest.mark.parametrize('kw', [dict(optimizer='adam'),
                                dict(optimizer='adamw', weight_decay=0.1),
                                dict(optimizer='sgd', momentum=0.9),
                                dict(optimizer='adam', weight_decay=0.01, grad_clip=1.0)])
def test_updates_are_the_undecayed_ones_times_the_block_scale(net, kw):
  _, params, blocks = net
  trainable = 'head+top:2'
  labels = optim.param_labels(params, trainable, blocks)
  plain = optim.make_optimizer(phase('p', lr=0.01, trainable=trainable, **kw), labels, 10)
  decayed = optim.make_optimizer(phase('p', lr=0.01, trainable=trainable, lr_decay=0.7, **kw),
                                 labels, 10, blocks=blocks)
  scales = _flat(optim.lr_scales(labels, 0.7, blocks))
  s_plain, s_decayed = plain.init(params), decayed.init(params)
  assert (jax.tree.structure(s_plain) ==
          jax.tree.structure(s_decayed)), 'lr_decay must not change the optimizer state layout'
  rng = np.random.default_rng(0)
  p_plain = p_decayed = params
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    # Both see the same params, and undecayed moments do not depend on the LR.
    u_plain, s_plain = plain.update(grads, s_plain, p_plain)
    u_decayed, s_decayed = decayed.update(grads, s_decayed, p_plain)
    for k, u in _flat(u_plain).items():
      expected = np.asarray(u) * (scales[k] if _flat(labels)[k] == optim.TRAINABLE else 0.0)
      np.testing.assert_allclose(np.asarray(_flat(u_decayed)[k]), expected, rtol=1e-6,
                                 atol=1e-9, err_msg=k)
    p_plain = optax.apply_updates(p_plain, u_plain)
  frozen = [k for k, v in _flat(labels).items() if v == optim.FROZEN]
  assert frozen and all(not np.any(_flat(u_decayed)[k]) for k in frozen)
  lowest = min(scales[k] for k, v in _flat(labels).items() if v == optim.TRAINABLE)
  assert lowest == pytest.approx(0.7 ** 2)


@pytest.mark.parametrize('value', [0.0, -0.5, 1.5, float('nan')])
def test_config_rejects_a_bad_decay(value):
  from configs import default
  c = default.get_config('tiny')
  c.phases[1].lr_decay = value
  with pytest.raises(ValueError, match='lr_decay'):
    tl_config.validate(c)
