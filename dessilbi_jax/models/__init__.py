"""The model zoo: Flax networks rebuilt from their widths (see ``networks.py``)."""

from dessilbi_jax.models.gpt import GPT
from dessilbi_jax.models.networks import LAYER_WIDTHS
from dessilbi_jax.models.networks import MLP
from dessilbi_jax.models.networks import VGG16
from dessilbi_jax.models.networks import BasicBlock
from dessilbi_jax.models.networks import BottleneckBlock
from dessilbi_jax.models.networks import CifarResNet
from dessilbi_jax.models.networks import Conv1DNet
from dessilbi_jax.models.networks import LeNet5
from dessilbi_jax.models.networks import ResNet
from dessilbi_jax.models.networks import count_flops
from dessilbi_jax.models.networks import count_params
from dessilbi_jax.models.networks import default_groups
from dessilbi_jax.models.networks import get_model
from dessilbi_jax.models.networks import list_models
from dessilbi_jax.models.networks import model_kwargs
from dessilbi_jax.models.networks import model_name
from dessilbi_jax.models.transformer import TransformerBlock
from dessilbi_jax.models.vit import ViT

__all__ = ('GPT', 'LAYER_WIDTHS', 'MLP', 'VGG16', 'BasicBlock', 'BottleneckBlock', 'CifarResNet', 'Conv1DNet', 'LeNet5',
           'ResNet', 'TransformerBlock', 'ViT', 'count_flops', 'count_params', 'default_groups', 'get_model', 'list_models', 'model_kwargs', 'model_name')
