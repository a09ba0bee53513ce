"""Dataset registry and loaders: digits, IDX (Fashion-MNIST / MNIST), CIFAR pickle batches, downloads.

Fake files are written here with :mod:`struct` / :mod:`pickle` / :mod:`tarfile`, independently of
the readers, and the loaded arrays are compared with the numbers written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pluggy
import pytest

from combinability import hookspecs
from combinability.data import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    DatasetSpec,
    cifar,
    download,
    load_dataset,
    locate,
    mnist,
    registry,
)
from combinability.data.idx import read_idx
from combinability.errors import CorruptFileError, DatasetError, DatasetNotFoundError, PluginError, UnknownNameError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# -- helpers: writers independent of the readers ------------------------------------------------
def idx_bytes(array: np.ndarray, code: int) -> bytes:
    fmt = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=fmt).tobytes()


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    data = idx_bytes(array, code)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_fake_mnist(directory: Path, n_train=7, n_test=3, gz=False, seed=0, size=(28, 28)):
    rng = np.random.default_rng(seed)
    raw = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(directory / IDX_NAMES[split][0], images, gz=gz)
        write_idx(directory / IDX_NAMES[split][1], labels, gz=gz)
        raw[split] = (images, labels)
    return raw


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $COMBINABILITY_DATA, an empty cache, and system directories that do not exist."""
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(locate, "SYSTEM_DIRS", {
        "fashion_mnist": (str(tmp_path / "usr-share-fashion-mnist"),),
        "mnist": (str(tmp_path / "usr-share-mnist"),),
    })
    return tmp_path


# -- registry ------------------------------------------------------------------------------------
def test_builtin_specs_and_hook():
    assert set(DATASETS) == {"digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "jargon"}
    assert SPLITS == ("train", "test")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(registry)
    (specs,) = pm.hook.combinability_register_datasets()
    assert {s.name for s in specs} == set(DATASETS)
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["cifar10"].input_shape == (3, 32, 32)


def test_registry_imports_no_loader_dependency():
    code = ("import sys, combinability.data as d; names = sorted(d.DATASETS); "
            "print([m for m in ('sklearn', 'torch', 'jax') if m in sys.modules], len(names))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.strip()
    assert out == "[] 6"


def test_unknown_dataset_and_split_list_valid_names():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet", "train")
    assert isinstance(err.value, KeyError)
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(UnknownNameError, match="'train', 'test'"):
        load_dataset("digits", "validation")
    with pytest.raises(UnknownNameError, match="'train', 'test'"):
        mnist.load_fashion_mnist("val")


def test_plugin_spec_with_callable_and_string_loaders():
    def tiny(split, root=None):
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        return ArrayDataset(x, np.array([0, 1, 0, 1]), num_classes=2)

    spec = DatasetSpec("tiny", tiny, num_classes=2, input_shape=(3,))
    got = load_dataset(spec, "test", limit=3)
    assert (got.name, got.split, len(got)) == ("tiny", "test", 3)  # name and split filled in
    np.testing.assert_array_equal(got.x, np.arange(9, dtype=np.float32).reshape(3, 3))

    by_string = DatasetSpec("d2", "combinability.data.digits:load_digits")
    assert len(load_dataset("d2", "test", registry={"d2": by_string})) == len(load_dataset("digits", "test"))

    bad = DatasetSpec("bad", lambda split, root=None: (np.zeros(3), np.zeros(3)))
    with pytest.raises(PluginError, match="ArrayDataset"):
        load_dataset(bad, "train")
    with pytest.raises(DatasetError, match="positive integer"):
        load_dataset(spec, "train", limit=0)
    with pytest.raises(DatasetError, match="nothing to download"):
        download(spec)


def test_limit_reaches_loaders_that_take_it():
    seen = []

    def limited(split, root=None, limit=None):
        seen.append(limit)
        n = 4 if limit is None else min(limit, 4)  # converts only what is asked for
        return ArrayDataset(np.arange(3 * n, dtype=np.float32).reshape(n, 3), np.arange(n) % 2, num_classes=2)

    def by_keywords(split, root=None, **options):
        seen.append(options.get("limit"))
        return ArrayDataset(np.zeros((5, 3), np.float32), np.zeros(5, np.int64), num_classes=2)

    got = load_dataset(DatasetSpec("lim", limited), "train", limit=np.int64(2))  # any integer type
    assert len(got) == 2 and seen == [2] and type(seen[0]) is int
    np.testing.assert_array_equal(got.x, [[0, 1, 2], [3, 4, 5]])
    assert len(load_dataset(DatasetSpec("lim", limited), "train")) == 4 and seen[-1] is None
    assert len(load_dataset(DatasetSpec("kw", by_keywords), "test", limit=3)) == 3 and seen[-1] == 3
    with pytest.raises(DatasetError, match="positive integer"):
        load_dataset(DatasetSpec("lim", limited), "train", limit=True)


def test_download_flag_calls_downloader_then_retries():
    calls = []

    def loader(split, root=None):
        if not calls:
            raise DatasetNotFoundError("not yet")
        return ArrayDataset(np.zeros((2, 1), np.float32), np.zeros(2, np.int64), 1)

    spec = DatasetSpec("later", loader, downloader=lambda root=None: calls.append(root) or Path("."))
    with pytest.raises(DatasetNotFoundError):
        load_dataset(spec, "train")
    assert len(load_dataset(spec, "train", root="somewhere", download=True)) == 2
    assert calls == ["somewhere"]


# -- digits ----------------------------------------------------------------------------------------
def test_digits_split_and_normalisation():
    from sklearn.datasets import load_digits as sk

    bunch = sk()
    seen: dict[int, int] = {}
    expect_test = []
    for i, label in enumerate(bunch.target):  # every fifth image of each class, in file order
        seen[label] = seen.get(label, 0) + 1
        if seen[label] % 5 == 0:
            expect_test.append(i)
    expect_train = sorted(set(range(len(bunch.target))) - set(expect_test))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.shape == (len(expect_train), 1, 8, 8) and test.x.shape == (len(expect_test), 1, 8, 8)
    np.testing.assert_array_equal(test.y, bunch.target[expect_test])
    np.testing.assert_array_equal(train.y, bunch.target[expect_train])
    # normalised with the training split's own statistics
    raw_train = bunch.images[expect_train] / 16.0
    mean, std = raw_train.mean(), raw_train.std()
    np.testing.assert_allclose(train.x[:, 0], (raw_train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(test.x[:, 0], (bunch.images[expect_test] / 16.0 - mean) / std, atol=1e-5)
    assert train.classes == tuple("0123456789") and train.num_classes == 10


# -- IDX reader ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("code", "dtype"), [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                             (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_exact(tmp_path, gz, code, dtype):
    rng = np.random.default_rng(code)
    array = (rng.standard_normal((4, 3, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / "a-idx3", array, code=code, gz=gz)
    got = read_idx(path)
    assert got.shape == (4, 3, 5) and got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((5, 4, 3), np.uint8), 0x08)[:-7]  # 16 + 60 bytes expected, 69 held
    path = tmp_path / ("img.gz" if gz else "img")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DatasetError) as err:
        read_idx(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg and "header says 5 images of 4x3" in msg
    assert "holds 69 bytes" in msg


def test_read_idx_rejects_malformed(tmp_path):
    good = idx_bytes(np.arange(6, dtype=np.uint8), 0x08)
    cases = {
        "magic": (b"\x12\x34" + good[2:], "not an IDX file"),
        "type": (good[:2] + b"\x0a" + good[3:], "unknown IDX type code 0x0a"),
        "trailing": (good + b"\x00\x01", "trailing data"),
        "short": (b"\x00\x00", "truncated"),
        "header": (good[:6], "truncated"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DatasetError, match=message):
            read_idx(path)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(good * 100)[:-20])
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(broken)


# -- MNIST / Fashion-MNIST loaders ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_reads_fake_files_exactly(isolated, name, gz):
    raw = write_fake_mnist(isolated / "data", gz=gz)
    mean, std = mnist.NORMALIZATION[name]
    for split in SPLITS:
        ds = load_dataset(name, split, root=isolated / "data")
        images, labels = raw[split]
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
        assert ds.x.shape == (len(labels), 1, 28, 28) and (ds.name, ds.split) == (name, split)
        np.testing.assert_allclose(ds.x[:, 0] * std + mean, images / 255.0, atol=1e-6)
        np.testing.assert_array_equal(ds.y, labels)
        first = load_dataset(name, split, root=isolated / "data", limit=3)  # only these are converted
        np.testing.assert_allclose(first.x[:, 0] * std + mean, images[:3] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(first.y, labels[:3])
    assert load_dataset("fashion_mnist", "train", root=isolated / "data").classes[9] == "Ankle boot"


def test_search_order_root_then_env_then_cache_then_system(isolated, monkeypatch):
    dirs = {
        "root": isolated / "explicit",
        "env": isolated / "env" / "fashion_mnist",
        "cache": isolated / "xdg-cache" / "combinability" / "fashion_mnist",
        "system": isolated / "usr-share-fashion-mnist",
    }
    labels = {}
    for i, (key, d) in enumerate(dirs.items()):
        labels[key] = write_fake_mnist(d, seed=i)["train"][1]
    monkeypatch.setenv(locate.ENV_VAR, str(isolated / "env"))
    for key in dirs:
        root = dirs["root"] if key == "root" else None
        got = load_dataset("fashion_mnist", "train", root=root).y
        np.testing.assert_array_equal(got, labels[key])
        if key == "env":
            monkeypatch.delenv(locate.ENV_VAR)
        elif key != "root":
            for f in dirs[key].iterdir():
                f.unlink()
    # root/<name>/ is searched too
    write_fake_mnist(isolated / "parent" / "fashion_mnist", seed=9)
    assert len(load_dataset("fashion_mnist", "test", root=isolated / "parent")) == 3


def test_missing_files_error_says_where_and_how(isolated, monkeypatch):
    monkeypatch.setenv(locate.ENV_VAR, str(isolated / "env"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", "train", root=isolated / "mine")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for d in (isolated / "mine", isolated / "mine" / "fashion_mnist", isolated / "env" / "fashion_mnist",
              isolated / "xdg-cache" / "combinability" / "fashion_mnist", isolated / "usr-share-fashion-mnist"):
        assert str(d) in msg
    assert "train-images-idx3-ubyte" in msg
    assert "combinability download fashion_mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    # a directory holding only part of the files is reported with what it lacks
    write_idx(isolated / "mine" / IDX_NAMES["train"][0], np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DatasetNotFoundError, match=r"missing train-labels-idx1-ubyte\[\.gz\]"):
        mnist.load_mnist("train", root=isolated / "mine")


def test_inconsistent_idx_files(isolated):
    d = isolated / "d"
    write_idx(d / IDX_NAMES["test"][0], np.zeros((3, 28, 28), np.uint8))
    write_idx(d / IDX_NAMES["test"][1], np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="3 images but .* 4 labels"):
        load_dataset("mnist", "test", root=d)
    write_idx(d / IDX_NAMES["test"][1], np.array([0, 10, 2], np.uint8))
    with pytest.raises(DatasetError, match="label 10 out of range"):
        load_dataset("mnist", "test", root=d)
    write_idx(d / IDX_NAMES["test"][0], np.zeros((3, 784), np.uint8))
    with pytest.raises(DatasetError, match="shape"):
        load_dataset("mnist", "test", root=d)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(isolated, monkeypatch):
    monkeypatch.setattr(locate, "SYSTEM_DIRS", {"fashion_mnist": (str(FMNIST_DIR),)})
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(train.y), np.full(10, 6000))  # balanced, as published
    np.testing.assert_array_equal(np.bincount(test.y), np.full(10, 1000))
    x = train.x.astype(np.float64)
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5  # stored constants = train statistics
    assert train.classes[train.y[0]] == "Ankle boot"  # the first training image of Fashion-MNIST


# -- CIFAR ---------------------------------------------------------------------------------------
def write_batch(path: Path, data: np.ndarray, labels, label_key: str, bytes_keys: bool, protocol=2):
    entry = {"data": data, label_key: list(map(int, labels)), "batch_label": "fake"}
    if bytes_keys:  # what Python 2 pickles (the official files) look like
        entry = {k.encode(): v for k, v in entry.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entry, protocol=protocol))


def write_fake_cifar(folder: Path, which: str, n=4, bytes_keys=True, seed=0):
    layout = cifar.LAYOUTS[which]
    rng = np.random.default_rng(seed)
    raw = {}
    for split, files in (("train", layout.train_files), ("test", layout.test_files)):
        datas, labels = [], []
        for f in files:
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            lab = rng.integers(0, layout.num_classes, size=n)
            write_batch(folder / f, data, lab, layout.label_key, bytes_keys, protocol=2 if bytes_keys else 5)
            datas.append(data)
            labels.append(lab)
        raw[split] = (np.concatenate(datas), np.concatenate(labels))
    names = [f"class{i}".encode() for i in range(layout.num_classes)]
    meta = {layout.names_key.encode(): names} if bytes_keys else {layout.names_key: [n.decode() for n in names]}
    (folder / layout.meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return raw


@pytest.mark.parametrize(("which", "bytes_keys"), [("cifar10", True), ("cifar10", False), ("cifar100", True)])
def test_cifar_reads_fake_batches_exactly(isolated, which, bytes_keys):
    layout = cifar.LAYOUTS[which]
    raw = write_fake_cifar(isolated / "c" / which / layout.folder, which, bytes_keys=bytes_keys)
    mean, std = np.array(layout.mean), np.array(layout.std)
    for split in SPLITS:
        ds = load_dataset(which, split, root=isolated / "c")  # root/<name>/<folder>/
        data, labels = raw[split]
        assert ds.x.shape == (len(labels), 3, 32, 32) and ds.x.dtype == np.float32
        # channel c of pixel (i, j) is byte 1024 c + 32 i + j of the row
        pixels = data.reshape(-1, 3, 1024).reshape(-1, 3, 32, 32) / 255.0
        np.testing.assert_allclose(ds.x * std[:, None, None] + mean[:, None, None], pixels, atol=1e-6)
        np.testing.assert_array_equal(ds.y, labels)
        assert ds.classes[layout.num_classes - 1] == f"class{layout.num_classes - 1}"
        assert ds.num_classes == layout.num_classes
    # the batches folder itself as root
    ds = cifar.load_cifar(layout, "test", root=isolated / "c" / which / layout.folder)
    np.testing.assert_array_equal(ds.y, raw["test"][1])
    data, labels = raw["train"]
    first = load_dataset(which, "train", root=isolated / "c", limit=3)  # only these are converted
    np.testing.assert_allclose(first.x * std[:, None, None] + mean[:, None, None],
                               data[:3].reshape(-1, 3, 32, 32) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(first.y, labels[:3])


def test_cifar_rejects_bad_files(isolated):
    folder = isolated / "cifar-10-batches-py"
    write_fake_cifar(folder, "cifar10")
    batch = folder / "test_batch"
    whole = batch.read_bytes()
    batch.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptFileError, match="test_batch.*truncated"):
        load_dataset("cifar10", "test", root=folder)

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(isolated / "pwned"),))

    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(CorruptFileError, match="refusing"):
        load_dataset("cifar10", "test", root=folder)
    assert not (isolated / "pwned").exists()

    write_batch(batch, np.zeros((2, 100), np.uint8), [0, 1], "labels", True)
    with pytest.raises(DatasetError, match=r"shape \(n, 3072\)"):
        load_dataset("cifar10", "test", root=folder)
    write_batch(batch, np.zeros((2, 3072), np.uint8), [0, 1, 2], "labels", True)
    with pytest.raises(DatasetError, match="2 images"):
        load_dataset("cifar10", "test", root=folder)


def test_cifar_missing_says_where_and_how(isolated):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100", "train", root=isolated / "nowhere")
    msg = str(err.value)
    assert str(isolated / "nowhere") in msg and "cs.toronto.edu" in msg and "combinability download cifar100" in msg
    assert str(isolated / "xdg-cache" / "combinability" / "cifar100") in msg


# -- downloads (pooch, from a local HTTP server: no network) -------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts the requests for each path."""

    requests: collections.Counter

    def do_GET(self):  # noqa: N802 - the http.server name
        type(self).requests[self.path] += 1
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` on 127.0.0.1 from a thread; yield (base URL, Counter of requested paths)."""
    handler = type("Handler", (_Handler,), {"requests": collections.Counter()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def no_proxy(monkeypatch):
    """requests must reach the local server directly, whatever proxy the environment names."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_remote_mnist(tmp: Path, base: str):
    """Four gzipped IDX files in ``tmp/remote`` (served at ``base``), and their Resource entries.

    Each resource's first URL does not exist on the server (a dead mirror), its second does.
    """
    raw = write_fake_mnist(tmp / "remote", gz=True, seed=3)
    resources = tuple(
        locate.Resource(f + ".gz", (f"{base}absent/{f}.gz", f"{base}{f}.gz"),
                        md5((tmp / "remote" / (f + ".gz")).read_bytes()))
        for names in IDX_NAMES.values() for f in names
    )
    return raw, resources


def test_download_from_mirrors_with_fallback_and_checksum(isolated, monkeypatch, no_proxy):
    with serve_folder(isolated / "remote") as (base, requests):
        raw, resources = fake_remote_mnist(isolated, base)
        monkeypatch.setitem(mnist.RESOURCES, "fashion_mnist", resources)
        directory = download("fashion_mnist", root=isolated / "dl")
        assert directory == isolated / "dl" / "fashion_mnist"
        assert sorted(p.name for p in directory.iterdir()) == sorted(r.filename for r in resources)
        ds = load_dataset("fashion_mnist", "train", root=isolated / "dl")
        np.testing.assert_array_equal(ds.y, raw["train"][1])
        served = sum(requests.values())
        download("fashion_mnist", root=isolated / "dl")  # files with the right checksum: not fetched again
        assert sum(requests.values()) == served


def test_download_rejects_bad_checksum_and_keeps_nothing(isolated, monkeypatch, no_proxy):
    with serve_folder(isolated / "remote") as (base, _):
        _, resources = fake_remote_mnist(isolated, base)
        wrong = tuple(locate.Resource(r.filename, r.urls, "0" * 32) for r in resources)
        monkeypatch.setitem(mnist.RESOURCES, "mnist", wrong)
        with pytest.raises(DatasetError, match="MD5") as err:
            download("mnist", root=isolated / "dl")
        assert resources[0].urls[1] in str(err.value) and str(isolated / "dl" / "mnist") in str(err.value)
        assert list((isolated / "dl" / "mnist").iterdir()) == []
        unreachable = tuple(locate.Resource(r.filename, r.urls[:1], r.md5) for r in resources)
        monkeypatch.setitem(mnist.RESOURCES, "mnist", unreachable)
        with pytest.raises(DatasetNotFoundError, match="could not download") as err:
            download("mnist", root=isolated / "dl")
        assert resources[0].urls[0] in str(err.value) and "404" in str(err.value)
        assert list((isolated / "dl" / "mnist").iterdir()) == []


def test_load_with_download_true_uses_default_place(isolated, monkeypatch, no_proxy):
    with serve_folder(isolated / "remote") as (base, _):
        raw, resources = fake_remote_mnist(isolated, base)
        monkeypatch.setitem(mnist.RESOURCES, "mnist", resources)
        monkeypatch.setenv(locate.ENV_VAR, str(isolated / "datahome"))
        ds = load_dataset("mnist", "test", download=True)
    np.testing.assert_array_equal(ds.y, raw["test"][1])
    assert (isolated / "datahome" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_cifar_download_extracts_archive(isolated, monkeypatch, no_proxy):
    layout = cifar.LAYOUTS["cifar10"]
    raw = write_fake_cifar(isolated / "src" / layout.folder, "cifar10", n=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(isolated / "src" / layout.folder, arcname=layout.folder)
    archive = isolated / "remote" / layout.archive.filename
    archive.parent.mkdir()
    archive.write_bytes(buffer.getvalue())
    with serve_folder(archive.parent) as (base, _):
        resource = locate.Resource(archive.name, (base + archive.name,), md5(buffer.getvalue()))
        monkeypatch.setitem(cifar.LAYOUTS, "cifar10", dataclasses.replace(layout, archive=resource))
        folder = download("cifar10", root=isolated / "dl")
    assert folder == isolated / "dl" / "cifar10" / layout.folder
    ds = load_dataset("cifar10", "train", root=isolated / "dl")
    np.testing.assert_array_equal(ds.y, raw["train"][1])
    assert not (isolated / "dl" / "cifar10" / archive.name).exists()  # archive removed once extracted


def test_a_mapping_of_splits_gives_the_split_asked_for_and_names_the_ones_it_has():
    from combinability.data.convert import as_dataset
    from combinability.errors import DatasetError

    rng = np.random.default_rng(0)
    test = (rng.normal(size=(5, 3)).astype(np.float32), np.arange(5) % 2)
    train = (rng.normal(size=(7, 3)).astype(np.float32), np.arange(7) % 2)
    got = as_dataset({"test": test, "train": train}, "train")
    np.testing.assert_array_equal(got.x, train[0])
    assert got.split == "train" and len(as_dataset({"test": test, "train": train}, "test")) == 5
    with pytest.raises(DatasetError, match=r"maps splits \['test', 'train'\].*no 'valid' split"):
        as_dataset({"test": test, "train": train}, "valid")


def test_an_npz_whose_arrays_differ_in_length_is_named_in_the_error(tmp_path):
    from combinability.data.convert import as_dataset
    from combinability.errors import DatasetError

    path = tmp_path / "bad.npz"
    np.savez(path, x_test=np.zeros((5, 3), np.float32), y_test=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match=r"bad\.npz \('x_test', 'y_test'\): x has 5 examples but y has 4"):
        as_dataset(str(path), "test")
