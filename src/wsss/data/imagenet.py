"""ImageNet input statistics: the normalisation every ImageNet-pretrained backbone here expects (RGB in [0, 1]).

Kept apart from :mod:`wsss.data.transforms` so that modules needing only the numbers (the ViT wrapper, SEC's
image recovery) do not import torchvision, which makes checking a config at load slow."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
