"""Regenerates every golden parity fixture from the real reference libraries.

Run in the reference environment (`make fixtures`): torchvision, timm, Keras and
efficientnet-lite-pytorch produce the outputs that CI later compares against.
"""

import subprocess
import sys

GENERATORS = (
    'tools.fixtures_torch_pickles',
    'tools.fixtures_torchvision',
    'tools.fixtures_torchvision_mobilenet',
    'tools.fixtures_keras',
    'tools.fixtures_efficientnet',
    'tools.fixtures_vit',
    'tools.fixtures_convnext',
    'tools.fixtures_timm_resnet',
    'tools.fixtures_timm_cnn',
)


def main():
  for module in GENERATORS:
    print(f'== {module}', flush=True)
    subprocess.run([sys.executable, '-m', module], check=True)


if __name__ == '__main__':
  main()
