"""The toy hierarchy and the paper's toy experiment, where absorption is easy to see.

``model`` holds :class:`ToyHierarchy` (parents, their mutually exclusive
children, independent features, known directions) and the short trainer
configuration the toy trainings use; ``demo`` runs the experiment behind
``make demo`` (a Matryoshka SAE against a plain SAE, scored and plotted).
"""

from sae_lens_matryoshka.toy.model import ToyHierarchy, short_run_trainer_config, single_thread

__all__ = ["ToyHierarchy", "short_run_trainer_config", "single_thread"]
