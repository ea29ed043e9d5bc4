"""Files in and out: checkpoints, checked loading, the loaders users reach, formats, the Hub.

- ``checkpoints``: checkpoints written whole or not at all, and the checks
  resuming makes;
- ``safe_loading``: a saved folder's files checked before any weights are read;
- ``loaders``: the one conversion from the training to the inference form,
  and SAELens's loaders wrapped so that every one of them checks and converts;
- ``interop``: the portable export and the imports from other libraries;
- ``hub``: upload with a model card, one-line Hub errors;
- ``local_sources``: model and dataset folders for offline runs.
"""
