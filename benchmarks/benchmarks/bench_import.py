"""Import time: the core imports no framework, and listing plugins imports none either."""


class Import:
    timeout = 120

    def timeraw_import_combinability(self):
        return "import combinability"

    def timeraw_list_plugins(self):
        return "import combinability as cb; cb.list_backends(); cb.list_architectures(); cb.list_samplers()"

    def timeraw_import_torch_backend(self):
        return "import combinability as cb; cb.get_backend('torch')"
