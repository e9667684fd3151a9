"""Encoder and pretraining objectives."""
from .skelemixclr import VARIANTS, SkeleMixCLR, build_pretrain_model, contrastive_loss
from .stgcn import STGCN, GraphConv, STGCNBlock, init_weights, mlp_head

__all__ = ["STGCN", "GraphConv", "STGCNBlock", "SkeleMixCLR", "VARIANTS", "build_pretrain_model",
           "contrastive_loss", "init_weights", "mlp_head"]
