"""timm CNN state dicts → tljax variables (ResNet here; more families join `TIMM_CONVERTERS`).

timm's ResNets use torchvision's key names and layout, so they share
`tljax.porting.torchvision.convert_resnet`; what differs is only the
preprocessing, which `tljax.porting.timm` reads from the file's config.
"""

from __future__ import annotations

from typing import Callable

from tljax.porting.convert import StateDictReader
from tljax.porting.torchvision import convert_resnet

TIMM_CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    arch: convert_resnet for arch in ('resnet18', 'resnet34', 'resnet50')
}
