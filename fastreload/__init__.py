"""fastreload: reload new weights into a live PyTorch model in place, layer by layer.

    report = fastreload.reload_layerwise(model, state_dict)

Every parameter and persistent buffer keeps its object and storage; copies are
fused into few calls of the C++ op torch.ops.fastreload.batched_copy_.
"""

from fastreload import ops, sync
from fastreload.errors import ReloadError
from fastreload.model import forget
from fastreload.recording import Recording, record
from fastreload.regions import Target
from fastreload.reload import DEFAULT_BATCH_BYTES, DEFAULT_REPLAY_BATCH_BYTES, reload_layerwise
from fastreload.report import ReloadReport

__all__ = ["DEFAULT_BATCH_BYTES", "DEFAULT_REPLAY_BATCH_BYTES", "Recording", "ReloadError", "ReloadReport", "Target", "forget", "ops", "record",
           "reload_layerwise", "sync"]
__version__ = "0.1.0"
