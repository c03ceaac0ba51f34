"""Early-exit encoders and exit heads (one interface for every encoder)."""

from earlyexit_brain.models.conformer import EarlyExitConformerEncoder  # noqa: F401
from earlyexit_brain.models.exits import CTCExitHeads, resolve_exit_layers  # noqa: F401
