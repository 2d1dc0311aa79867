"""Model adapters for diffusers transformers, one file per family, and the bundled default pipeline.

Importing this package registers every adapter with :mod:`accel.adapters`.
"""

from accel.pipelines import (
    cogvideox,  # noqa: F401
    dit,  # noqa: F401
    flux,  # noqa: F401
    hunyuan_video,  # noqa: F401
    ltx,  # noqa: F401
    pixart,  # noqa: F401
    sana,  # noqa: F401
    sd3,  # noqa: F401
    wan,  # noqa: F401
)
