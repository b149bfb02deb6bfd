"""Sparse autoencoders: architectures (registry), training, SAELens-layout IO, metrics, encoding."""

from mmsae.sae.encode import encode_store
from mmsae.sae.io import check_d_in, load_sae, load_sparsity, save_sae
from mmsae.sae.metrics import centred_fvu, dead_fraction, dense_fraction, evaluate, l0, mse
from mmsae.sae.model import ARCHITECTURES, SAE, ReLUSAE, SAEConfig, TopKSAE, build_sae, register_architecture
from mmsae.sae.training import train_sae

__all__ = [
    "ARCHITECTURES", "SAE", "ReLUSAE", "SAEConfig", "TopKSAE", "build_sae", "centred_fvu", "check_d_in", "dead_fraction",
    "dense_fraction", "encode_store", "evaluate", "l0", "load_sae", "load_sparsity", "mse", "register_architecture",
    "save_sae", "train_sae",
]
