"""The plugin module named by this package's entry point.

It registers one architecture; the torch implementation is named by a string and
imported only when the torch backend first builds a ``tiny_mlp``.
"""

from combinability import Architecture, hookimpl


@hookimpl
def combinability_register_architectures():
    return [
        Architecture(
            "tiny_mlp",
            {"torch": "combinability_example_plugin.torch_impl:TinyMLP"},
            description="example plugin: MLP with two hidden layers of 32 x width units",
        )
    ]
