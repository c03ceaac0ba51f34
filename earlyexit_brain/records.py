"""JSON documents and files a model folder carries, as SpeechBrain loadables.

:class:`JsonRecord` holds a JSON document (the calibrated exit policies, the
latency table); :class:`FileRecord` records where a fetched file lies (the
n-gram LM). An inference folder's ``hyperparams.yaml`` names them, so they are on
the safe-loading allowlist (:mod:`earlyexit_brain.safe_load`).
"""

import json
from typing import Dict, Optional

from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from .files import atomic_write_text


@register_checkpoint_hooks
class JsonRecord:
    """A JSON document loaded and saved as a SpeechBrain loadable (``.data``)."""

    def __init__(self, data: Optional[Dict] = None):
        self.data = data or {}
        self.path: Optional[str] = None  # the file it was loaded from

    @mark_as_saver
    def _save(self, path):
        atomic_write_text(str(path), json.dumps(self.data, indent=2) + "\n")

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        self.path = str(path)
        try:
            with open(path) as fin:
                self.data = json.load(fin)
        except ValueError as err:  # a truncated or corrupted file
            raise ValueError(f"{path}: not a valid JSON document ({err})") from None


@register_checkpoint_hooks
class FileRecord:
    """A file a model needs at inference (its n-gram LM), fetched as a SpeechBrain
    loadable: loading records where the file is (``.path``)."""

    def __init__(self):
        self.path: Optional[str] = None

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        self.path = str(path)
