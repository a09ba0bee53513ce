"""Hugging Face model folders (``save_pretrained``): one weights file, or shards listed by an index.

Written here as ``save_pretrained`` writes them (the index's ``weight_map`` of tensor names to shard
files, ``model-00001-of-00002.safetensors``, ...), without transformers. The reference is the model's
own ``state_dict`` and outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import combinability as cb
from combinability.checkpoint import load_checkpoint, read_metadata
from combinability.errors import CorruptFileError

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(),
                               torch.nn.Linear(7, 3)).eval()


def _save_sharded(model, folder, *, torch_files: bool = False, shards: int = 2) -> dict[str, str]:
    """``model``'s state in ``shards`` files and an index, as save_pretrained names them."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    stem, suffix = ("pytorch_model", "bin") if torch_files else ("model", "safetensors")
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        chunk = {names[j]: state[names[j]] for j in part}
        if torch_files:
            torch.save(chunk, folder / file)
        else:
            safetensors_torch.save_file(chunk, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}  # sorted by name, as transformers writes it
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return weight_map


@pytest.mark.parametrize("torch_files", [False, True])
def test_a_sharded_folder_reads_as_its_model(tmp_path, torch_files):
    model = _model(0)
    weight_map = _save_sharded(model, tmp_path / "run", torch_files=torch_files, shards=3)
    for given in (tmp_path / "run", tmp_path / "run" / next(p.name for p in (tmp_path / "run").glob("*.index.json"))):
        ckpt = load_checkpoint(given)
        assert list(ckpt.state) == sorted(weight_map)  # the index's order (by name, as written)
        for name, tensor in model.state_dict().items():
            np.testing.assert_array_equal(ckpt.state[name], tensor.numpy())
    assert ckpt.metadata["total_size"] > 0 and ckpt.version == 0
    info = read_metadata(tmp_path / "run")
    assert info["tensors"]["0.weight"] == {"dtype": "float32", "shape": (7, 5)}
    loaded = cb.load_into(_model(1), tmp_path / "run")
    x = torch.randn(4, 5)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_a_folder_with_one_weights_file_reads_it(tmp_path):
    model = _model(2)
    (tmp_path / "run").mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                tmp_path / "run" / "model.safetensors")
    state = load_checkpoint(tmp_path / "run").state
    np.testing.assert_array_equal(state["3.bias"], model.state_dict()["3.bias"].numpy())


def test_a_damaged_or_incomplete_folder_is_refused_by_what_is_wrong(tmp_path):
    model = _model(3)
    folder = tmp_path / "run"
    weight_map = _save_sharded(model, folder)
    index = folder / "model.safetensors.index.json"
    shard = sorted(set(weight_map.values()))[1]
    (folder / shard).rename(folder / "elsewhere")
    with pytest.raises(CorruptFileError, match=f"names the shard '{shard}', which is missing"):
        load_checkpoint(folder)
    (folder / "elsewhere").rename(folder / shard)
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match=r"lacks \['extra.weight'\]"):
        load_checkpoint(folder)
    data["weight_map"]["extra.weight"] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptFileError, match="outside its folder"):
        load_checkpoint(folder)
    index.write_text("{not json")
    with pytest.raises(CorruptFileError, match="not a JSON shard index"):
        load_checkpoint(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorruptFileError, match=r"no shard index \(model.safetensors.index.json"):
        load_checkpoint(empty)
    both = tmp_path / "both"
    both.mkdir()
    for name in ("model.safetensors", "pytorch_model.bin"):
        (both / name).write_bytes(b"x")
    with pytest.raises(CorruptFileError, match="holds model.safetensors and pytorch_model.bin"):
        load_checkpoint(both)
