"""Matryoshka sparse autoencoders as a SAELens architecture.

Importing this package registers the architecture ``"matryoshka"`` with
SAELens, so ``LanguageModelSAERunnerConfig(sae=MatryoshkaTrainingSAEConfig(...))``,
runner configs given as dicts or JSON, the command line and
``SAE.load_from_disk`` / ``SAE.from_pretrained`` all know it.
"""

from sae_lens_matryoshka import distributed
from sae_lens_matryoshka.config import MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
from sae_lens_matryoshka.io.hub import upload_to_huggingface
from sae_lens_matryoshka.io.interop import (
    export_portable,
    from_dictionary_learning,
    from_saelens,
    from_saelens_release,
    from_sparsify,
    to_portable,
)
from sae_lens_matryoshka.io.loaders import load_sae, to_inference
from sae_lens_matryoshka.io.safe_loading import SAEFileError, check_sae_folder
from sae_lens_matryoshka.recipes import paper_recipe
from sae_lens_matryoshka.registration import register
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

__version__ = "0.1.0"

register()

__all__ = [
    "MatryoshkaSAE",
    "MatryoshkaSAEConfig",
    "MatryoshkaTrainingSAE",
    "MatryoshkaTrainingSAEConfig",
    "SAEFileError",
    "check_sae_folder",
    "distributed",
    "export_portable",
    "from_dictionary_learning",
    "from_saelens",
    "from_saelens_release",
    "from_sparsify",
    "load_sae",
    "paper_recipe",
    "register",
    "to_inference",
    "to_portable",
    "upload_to_huggingface",
]
