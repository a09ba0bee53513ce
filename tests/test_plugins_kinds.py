"""The one plugin door: every kind is registered through pluggy, and no plugin can break a look-up.

Test plugins are registered at run time with ``combinability.plugins.register_plugin``;
every test starts and ends with freshly discovered plugins.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from combinability import plugins
from combinability.errors import BackendUnavailableError, PluginError, UnknownNameError
from combinability.hookspecs import Registration, hookimpl

BUILTIN_ALIGNERS = {"weight", "activation", "identity"}


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset_plugins()
    yield
    plugins.reset_plugins()


def _record(call):
    """Run ``call()``; return its result and the messages of the RuntimeWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _my_aligner(task, **_):  # never called: only registered
    raise AssertionError("not called")


def _my_repair(theta, context):
    return theta * 2


def _my_metric(*args, **kwargs):
    return 0.5


class AlignerPlugin:
    def __init__(self, *registrations: Registration) -> None:
        self.registrations = list(registrations)

    @hookimpl
    def combinability_register_aligners(self):
        return self.registrations


class Returns:
    """A plugin whose aligner hook returns a fixed value."""

    def __init__(self, value) -> None:
        self.value = value

    @hookimpl
    def combinability_register_aligners(self):
        return self.value


class Raises:
    @hookimpl
    def combinability_register_aligners(self):
        raise RuntimeError("aligner hook exploded")

    @hookimpl
    def combinability_register_repairs(self):
        raise ValueError("repair hook exploded")


# -- the built-ins -------------------------------------------------------------------------------
def test_builtin_aligners_are_listed_with_metadata():
    assert BUILTIN_ALIGNERS <= set(plugins.list_aligners())
    assert plugins.list_plugins("aligners") == plugins.list_aligners()
    assert plugins.list_plugins("aligner") == plugins.list_aligners()  # the singular is accepted
    reg = plugins.get_registration("aligners", "activation")
    assert isinstance(reg, Registration) and reg.needs == ("data",) and reg.description
    assert plugins.get_registration("aligner", "weight").needs == ()
    assert plugins.Registration is Registration


def test_existing_kinds_still_work():
    assert "torch" in plugins.list_backends() and "mlp" in plugins.list_architectures()
    assert "digits" in plugins.list_datasets() and "uniform" in plugins.list_samplers()
    assert plugins.list_plugins("backends") == plugins.list_backends()
    assert plugins.get_architecture("mlp").name == "mlp"
    assert plugins.get_sampler_class("uniform").name == "uniform"


def test_no_repairs_or_metrics_built_in_yet_but_the_kinds_exist():
    assert plugins.list_repairs() == plugins.list_plugins("repairs")
    assert plugins.list_metrics() == plugins.list_plugins("metrics")


# -- broken plugins ------------------------------------------------------------------------------
def test_a_hook_that_raises_is_a_warning_naming_the_plugin_and_the_others_still_register():
    plugins.register_plugin(Raises(), name="exploding")
    plugins.register_plugin(AlignerPlugin(Registration("mine", _my_aligner, "mine")), name="good-one")
    names, messages = _record(plugins.list_aligners)
    assert BUILTIN_ALIGNERS | {"mine"} <= set(names)
    assert any("'exploding'" in m and "aligner hook exploded" in m for m in messages), messages
    assert plugins.get_aligner("mine") is _my_aligner
    # the same for another kind of the same plugin
    repairs, messages = _record(plugins.list_repairs)
    assert any("'exploding'" in m and "repair hook exploded" in m for m in messages), messages


@pytest.mark.parametrize(("value", "expected"), [
    ("weight", "expected a list"),
    ({"mine": "combinability.align.builtin:weight"}, "expected a list"),
    (Registration("mine", _my_aligner), "expected a list"),
    (42, "expected a list"),
    (["mine"], "Registration"),
    ([Registration("mine", 42)], "'module:callable' string or a callable"),
    ([Registration("", _my_aligner)], "Registration"),
])
def test_a_result_of_the_wrong_type_is_a_warning_not_a_crash(value, expected):
    plugins.register_plugin(Returns(value), name="wrong-type")
    plugins.register_plugin(AlignerPlugin(Registration("fine", _my_aligner)), name="fine-one")
    names, messages = _record(plugins.list_aligners)
    assert "mine" not in names
    assert BUILTIN_ALIGNERS | {"fine"} <= set(names)
    assert any("'wrong-type'" in m and expected in m for m in messages), messages


def test_a_hook_returning_none_registers_nothing_and_does_not_confuse_the_others():
    plugins.register_plugin(Returns(None), name="returns-none")
    plugins.register_plugin(AlignerPlugin(Registration("after", _my_aligner)), name="after-none")
    names, messages = _record(plugins.list_aligners)
    assert BUILTIN_ALIGNERS | {"after"} <= set(names)
    assert messages == []
    assert plugins.get_aligner("after") is _my_aligner


def test_a_malformed_backend_entry_is_a_warning():
    class BadBackend:
        @hookimpl
        def combinability_register_backends(self):
            return {"badfw": 42}

    plugins.register_plugin(BadBackend(), name="bad-backend")
    names, messages = _record(plugins.list_backends)
    assert "torch" in names and "badfw" not in names
    assert any("'bad-backend'" in m and "badfw" in m for m in messages), messages


# -- names: built-ins cannot be hidden; first third-party wins -----------------------------------------
def test_a_plugin_cannot_hide_a_builtin_aligner():
    import combinability.align.builtin as builtin

    plugins.register_plugin(AlignerPlugin(Registration("weight", _my_aligner, "impostor")), name="impostor")
    aligner, messages = _record(lambda: plugins.get_aligner("weight"))
    assert aligner is builtin.weight
    assert any("'impostor'" in m and "'aligners'" in m and "'weight'" in m for m in messages), messages


def test_a_builtin_wins_even_when_the_plugin_is_called_first():
    import combinability.align.builtin as builtin

    class First:
        @hookimpl(tryfirst=True)
        def combinability_register_aligners(self):
            return [Registration("identity", _my_aligner)]

    plugins.register_plugin(First(), name="tries-first")
    aligner, messages = _record(lambda: plugins.get_aligner("identity"))
    assert aligner is builtin.identity
    assert any("'tries-first'" in m and "identity" in m for m in messages), messages


def test_two_third_party_plugins_with_one_name_first_wins():
    def other(task, **_):
        raise AssertionError("not called")

    plugins.register_plugin(AlignerPlugin(Registration("shared", _my_aligner)), name="first-plugin")
    plugins.register_plugin(AlignerPlugin(Registration("shared", other)), name="second-plugin")
    aligner, messages = _record(lambda: plugins.get_aligner("shared"))
    assert aligner is _my_aligner
    assert any("'first-plugin'" in m and "'second-plugin'" in m and "'shared'" in m for m in messages), messages


def test_an_installed_plugin_reusing_a_builtin_plugin_name_cannot_hide_it(tmp_path):
    """An entry point named like a built-in ("aligners") loads; the built-in aligners stay."""
    site = tmp_path / "site"
    info = site / "squatter-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: squatter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[combinability.plugins]\naligners = squatter_plugin\n")
    (site / "squatter_plugin.py").write_text(textwrap.dedent(
        """
        from combinability.hookspecs import Registration, hookimpl

        def fake(task, **_):
            raise AssertionError

        @hookimpl
        def combinability_register_aligners():
            return [Registration("weight", fake), Registration("squatters_own", fake)]
        """))
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.path.insert(0, sys.argv[1])
        from combinability import plugins
        import combinability.align.builtin as builtin
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = plugins.list_aligners()
            same = plugins.get_aligner("weight") is builtin.weight
        print(same, "squatters_own" in names, any("squatter_plugin" in str(w.message) for w in caught))
        """)
    out = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


# -- look-ups --------------------------------------------------------------------------------------
def test_unknown_name_lists_the_installed_ones():
    with pytest.raises(UnknownNameError) as info:
        plugins.get_aligner("no_such_aligner")
    text = str(info.value)
    assert "no_such_aligner" in text and all(name in text for name in BUILTIN_ALIGNERS)
    with pytest.raises(UnknownNameError, match="repair 'nope'"):
        plugins.get_repair("nope")
    with pytest.raises(UnknownNameError, match="metric 'nope'"):
        plugins.get_metric("nope")


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(UnknownNameError, match="aligners") as info:
        plugins.list_plugins("gizmos")
    assert "gizmos" in str(info.value)
    with pytest.raises(UnknownNameError, match="aligners, repairs, metrics"):
        plugins.get_registration("backends", "torch")


def test_repairs_and_metrics_register_through_the_door():
    import combinability.repairs as repairs

    class Extras:
        @hookimpl
        def combinability_register_repairs(self):
            return [Registration("double", _my_repair, "doubles every weight", needs=("data",))]

        @hookimpl
        def combinability_register_metrics(self):
            return [Registration("half", f"{__name__}:_my_metric", "always one half")]

    plugins.register_plugin(Extras(), name="extras")
    assert "double" in plugins.list_repairs() and "double" in repairs.list_repairs()
    assert plugins.get_repair("double")(3, None) == 6
    assert repairs.get_repair("double") is _my_repair
    assert plugins.get_registration("repair", "double").needs == ("data",)
    assert "half" in plugins.list_metrics()
    assert plugins.get_metric("half") is _my_metric


def test_a_callable_passes_through():
    assert plugins.get_aligner(_my_aligner) is _my_aligner
    assert plugins.get_repair(_my_repair) is _my_repair


def test_a_registration_whose_target_is_missing_or_not_callable_fails_when_used():
    plugins.register_plugin(AlignerPlugin(
        Registration("ghost", "combinability.align.builtin:no_such_function"),
        Registration("constant", "combinability.plugins:KINDS"),
    ), name="sloppy")
    assert {"ghost", "constant"} <= set(plugins.list_aligners())  # listing imports nothing
    with pytest.raises(PluginError, match="ghost.*'sloppy'"):
        plugins.get_aligner("ghost")
    with pytest.raises(PluginError, match="constant.*not a callable"):
        plugins.get_aligner("constant")


# -- Registration ------------------------------------------------------------------------------------
def test_registration_loads_lazily():
    assert Registration("f", _my_aligner).load() is _my_aligner
    assert Registration("f", f"{__name__}:_my_repair").load() is _my_repair
    with pytest.raises(PluginError, match="module:attribute"):
        Registration("f", "no colon").load()
    with pytest.raises(ModuleNotFoundError):
        Registration("f", "combinability_no_such_module:f").load()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'combinability\[fakefw\]'"):
        Registration("f", "combinability_no_such_module:f", extra="fakefw").load()
    with pytest.raises(AttributeError):  # frozen
        Registration("f", _my_aligner).name = "g"


def test_cli_lists_the_new_kinds_with_descriptions(capsys):
    from combinability.cli import main

    plugins.register_plugin(AlignerPlugin(Registration("mine", _my_aligner, "my own aligner")), name="mine")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "aligners:" in out and "repairs:" in out and "metrics:" in out
    assert "weight matching" in out and "my own aligner" in out and "needs: data" in out
