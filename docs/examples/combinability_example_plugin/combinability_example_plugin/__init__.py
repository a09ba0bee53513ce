"""An example third-party plugin: registers the ``tiny_mlp`` architecture for torch."""
