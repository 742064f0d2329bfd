"""The model zoo: the networks of the five student reports, registered by name.

    from fastcifar.models import create_model, list_models, get_recipe
    model = create_model("resnet_2111", bn_backend="compiled")
"""
from fastcifar.models.norm import BACKENDS, NormAct, set_bn_backend
from fastcifar.models.registry import (TRAIN_FLOPS_PER_FORWARD, ModelInfo, count_params, create_model, fast_recipe,
                                       forward_flops, full_model_options, get_model_info, get_recipe, list_models, model_names,
                                       register)

# Importing the families registers their models.
from fastcifar.models import resnet, se_resnet, resnet_dropout, resnext, speedrun_net  # noqa: E402,F401,I001

__all__ = ["BACKENDS", "TRAIN_FLOPS_PER_FORWARD", "ModelInfo", "NormAct", "count_params", "create_model",
           "fast_recipe", "forward_flops", "full_model_options", "get_model_info", "get_recipe", "list_models", "model_names", "register", "set_bn_backend"]
