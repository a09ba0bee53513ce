"""The forward schedule of a layer table (framework-free): what each node reads, and what it may drop."""

from combinability.layers import LayerTable, Node


def test_schedule_drops_each_value_after_its_last_reader():
    table = LayerTable("skip", (5,), 2, (
        Node("l0", "dense", units=4), Node("a0", "relu"), Node("l1", "dense", units=4),
        Node("s", "add", inputs=("l1", "l0")), Node("l2", "dense", units=2)))
    got = [(node.name, reads, dropped) for node, reads, dropped in table.schedule]
    assert got == [
        ("l0", ("<input>",), ("<input>",)),
        ("a0", ("l0",), ()),  # l0 is read again by the skip
        ("l1", ("a0",), ("a0",)),
        ("s", ("l1", "l0"), ("l1", "l0")),
        ("l2", ("s",), ("s",)),
    ]
    assert [reads for _, reads, _ in table.schedule] == [table.inputs_of(n) for n in table.nodes]
