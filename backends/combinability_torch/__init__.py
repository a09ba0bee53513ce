"""The PyTorch backend of combinability and the torch reference architectures.

Importing this package imports no framework: :mod:`combinability_torch.plugin`
registers the backend with a factory that imports torch on first use.
"""

from __future__ import annotations

__all__: list[str] = []
