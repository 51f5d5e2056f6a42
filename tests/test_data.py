"""Data layer: downloads against a local HTTP server, official-format parsers, splits, sets.

Every archive here is a tiny file in the official format, built in a temporary directory.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch

from dnnmod.artifacts import load_tensors, read_json
from dnnmod.data import (
    ArrayUnpickler,
    combine,
    fetch,
    load_dataset,
    make_splits,
    mirror_url,
    prepare,
)
from dnnmod.data.formats import load_array_pickle
from dnnmod.data.official_archives import idx_bytes as idx
from dnnmod.data.official_archives import py2_pickle
from dnnmod.errors import (
    ArtifactError,
    ChecksumError,
    ConfigError,
    DownloadError,
    UnknownNameError,
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------- local HTTP server


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless ``server.honour_range`` is
    off; for names in ``server.drop_once`` sends half the body once, then closes."""

    def do_GET(self) -> None:
        server = self.server
        name = self.path.lstrip("/")
        server.log.append((name, self.headers.get("Range")))
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start, requested = 0, self.headers.get("Range")
        if requested and server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in server.drop_once:
            server.drop_once.discard(name)
            self.wfile.write(body[: len(body) // 2])
            return  # HTTP/1.0: the connection closes short of Content-Length
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.log, httpd.drop_once, httpd.honour_range = {}, [], set(), True
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}/files"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(httpd, name: str, data: bytes) -> str:
    httpd.files[f"files/{name}"] = data
    return f"{httpd.base}/{name}"


# ---------------------------------------------------------------- tiny official-format files


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar10_archive(per_batch: int = 10) -> tuple[bytes, dict]:
    members, truth = {}, {"train_images": [], "train_labels": []}
    for i in range(1, 6):
        images, labels = cifar_images(per_batch, i), [int(j % 10) for j in range(per_batch)]
        members[f"cifar-10-batches-py/data_batch_{i}"] = py2_pickle(
            {"batch_label": f"training batch {i} of 5", "data": images, "labels": labels})
        truth["train_images"].append(images)
        truth["train_labels"] += labels
    test_images = cifar_images(10, 99)
    members["cifar-10-batches-py/test_batch"] = py2_pickle(
        {"data": test_images, "labels": list(range(10))})
    members["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {"label_names": [f"class{c}" for c in range(10)]})
    truth["train_images"] = np.concatenate(truth["train_images"])
    truth["test_images"] = test_images
    return tar_gz(members), truth


def cifar100_archive() -> bytes:
    """Pickled by Python 3 (bytes keys), which the parser accepts too."""
    train_labels = [c % 100 for c in range(200)]
    return tar_gz({
        "cifar-100-python/train": pickle.dumps(
            {b"data": cifar_images(200, 1), b"fine_labels": train_labels,
             b"coarse_labels": [c // 5 for c in train_labels]}, protocol=4),
        "cifar-100-python/test": pickle.dumps(
            {b"data": cifar_images(100, 2), b"fine_labels": list(range(100))}, protocol=4),
        "cifar-100-python/meta": pickle.dumps(
            {b"fine_label_names": [f"fine{c}".encode() for c in range(100)]}, protocol=4),
    })


def svhn_mat(n: int, seed: int) -> tuple[bytes, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    digits = np.arange(n) % 10
    buffer = io.BytesIO()
    savemat(buffer, {"X": images, "y": np.where(digits == 0, 10, digits).reshape(n, 1)})
    return buffer.getvalue(), digits


FASHION_FILES = {"train_images": "train-images-idx3-ubyte.gz",
                 "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz",
                 "test_labels": "t10k-labels-idx1-ubyte.gz"}


def fashion_idx() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    return {"train_images": idx(rng.integers(0, 256, (30, 28, 28))),
            "train_labels": idx(np.arange(30) % 10),
            "test_images": idx(rng.integers(0, 256, (10, 28, 28))),
            "test_labels": idx(np.arange(10))}


# ---------------------------------------------------------------- download


def test_mirror_url_replaces_base():
    assert mirror_url("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "http://m.example/data/") == "http://m.example/data/cifar-10-python.tar.gz"


def test_fetch_resumes_with_range_after_dropped_connection(server, tmp_path):
    data = os.urandom(300_000)
    url = serve(server, "blob.bin", data)
    server.drop_once.add("files/blob.bin")
    dest = fetch(url, tmp_path / "blob.bin", md5(data), backoff=0)
    assert dest.read_bytes() == data
    assert not (tmp_path / "blob.bin.part").exists()
    (_, first_range), (_, second_range) = server.log
    assert first_range is None and second_range == f"bytes={len(data) // 2}-"


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    data = os.urandom(100_000)
    url = serve(server, "blob.bin", data)
    server.drop_once.add("files/blob.bin")
    server.honour_range = False
    assert fetch(url, tmp_path / "blob.bin", md5(data), backoff=0).read_bytes() == data


def test_fetch_checksum_mismatch_leaves_nothing(server, tmp_path):
    url = serve(server, "blob.bin", b"payload")
    with pytest.raises(ChecksumError, match=r"blob\.bin.*expected 0{32}, got " + md5(b"payload")):
        fetch(url, tmp_path / "blob.bin", "0" * 32, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_fetch_completes_a_part_that_is_already_whole(server, tmp_path):
    data = os.urandom(1000)
    url = serve(server, "blob.bin", data)
    (tmp_path / "blob.bin.part").write_bytes(data)  # killed between transfer and rename
    assert fetch(url, tmp_path / "blob.bin", md5(data)).read_bytes() == data
    assert server.log == [("files/blob.bin", "bytes=1000-")]


def test_fetch_replaces_a_stale_file(server, tmp_path):
    url = serve(server, "blob.bin", b"new")
    (tmp_path / "blob.bin").write_bytes(b"old")
    assert fetch(url, tmp_path / "blob.bin", md5(b"new")).read_bytes() == b"new"


def test_fetch_existing_good_file_needs_no_network(server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"payload")
    fetch(f"{server.base}/blob.bin", tmp_path / "blob.bin", md5(b"payload"))
    assert server.log == []


def test_fetch_missing_file_fails_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{server.base}/nothing", tmp_path / "nothing", "0" * 32, backoff=0)
    assert len(server.log) == 1


def test_fetch_unreachable_server_raises_after_retries(tmp_path):
    with pytest.raises(DownloadError, match="3 attempts"):
        fetch("http://127.0.0.1:9/x", tmp_path / "x", "0" * 32, retries=2, timeout=2, backoff=0)


# ---------------------------------------------------------------- prepare from the official formats


def test_prepare_cifar10_from_mirror(server, tmp_path):
    archive, truth = cifar10_archive()
    serve(server, "cifar-10-python.tar.gz", archive)
    out = prepare("cifar10", tmp_path, mirror=server.base,
                  files={"archive": {"md5": md5(archive)}})
    tensors = load_tensors(out / "images.safetensors")
    assert tensors["train_images"].shape == (50, 3, 32, 32)
    assert tensors["train_images"].dtype == torch.uint8
    assert torch.equal(tensors["train_images"].flatten(1),
                       torch.from_numpy(truth["train_images"]))
    assert tensors["train_labels"].dtype == torch.int64
    assert tensors["train_labels"].tolist() == [j % 10 for j in range(10)] * 5
    assert torch.equal(tensors["test_images"].flatten(1), torch.from_numpy(truth["test_images"]))
    meta = read_json(out / "meta.json")
    assert meta["class_names"] == [f"class{c}" for c in range(10)]
    assert meta["counts"] == {"train": 50, "test": 10}
    expected_mean = truth["train_images"].reshape(50, 3, -1).mean(axis=(0, 2)) / 255
    assert np.allclose(meta["channels_mean"], expected_mean)
    assert meta["source"]["files"]["archive"]["url"] == f"{server.base}/cifar-10-python.tar.gz"

    server.log.clear()  # a second prepare uses the raw file already downloaded
    prepare("cifar10", tmp_path, mirror=server.base, files={"archive": {"md5": md5(archive)}})
    assert server.log == []


def test_prepare_cifar100_uses_fine_labels(server, tmp_path):
    archive = cifar100_archive()
    serve(server, "cifar-100-python.tar.gz", archive)
    out = prepare("cifar100", tmp_path, mirror=server.base,
                  files={"cifar-100-python.tar.gz": {"md5": md5(archive)}})
    data = load_dataset(tmp_path, "cifar100", seed=0)
    assert data.num_classes == 100 and data.class_names[7] == "fine7"
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 100
    assert load_tensors(out / "images.safetensors")["test_labels"].tolist() == list(range(100))


def test_prepare_svhn_maps_label_10_to_0(server, tmp_path):
    train, train_digits = svhn_mat(20, 1)
    test, _ = svhn_mat(10, 2)
    serve(server, "train_32x32.mat", train)
    serve(server, "test_32x32.mat", test)
    out = prepare("svhn", tmp_path, mirror=server.base,
                  files={"train": {"md5": md5(train)}, "test": {"md5": md5(test)}})
    tensors = load_tensors(out / "images.safetensors")
    assert tensors["train_labels"].tolist() == train_digits.tolist()
    from scipy.io import loadmat

    x = loadmat(io.BytesIO(train))["X"]
    assert torch.equal(tensors["train_images"][3], torch.from_numpy(x[..., 3].transpose(2, 0, 1)))


def test_prepare_tinyimagenet_zip(server, tmp_path):
    from PIL import Image

    wnids = [f"n{c:08d}" for c in range(200)]

    def jpeg(seed: int, mode: str = "RGB") -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG")
        return buffer.getvalue()

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "\n".join(reversed(wnids)))
        zf.writestr("tiny-imagenet-200/words.txt", "\n".join(f"{w}\tthing {w}, other"
                                                             for w in wnids))
        for c, wnid in enumerate(wnids):
            zf.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_0.JPEG",
                        jpeg(c, "L" if c == 5 else "RGB"))
        zf.writestr("tiny-imagenet-200/val/images/val_0.JPEG", jpeg(1000))
        zf.writestr("tiny-imagenet-200/val/images/val_1.JPEG", jpeg(1001))
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt",
                    f"val_0.JPEG\t{wnids[3]}\t0\t0\t9\t9\nval_1.JPEG\t{wnids[0]}\t0\t0\t9\t9\n")
    archive = buffer.getvalue()
    serve(server, "tiny-imagenet-200.zip", archive)
    out = prepare("tinyimagenet", tmp_path, mirror=server.base,
                  files={"archive": {"md5": md5(archive)}})
    tensors = load_tensors(out / "images.safetensors")
    assert tensors["train_images"].shape == (200, 3, 64, 64)
    assert tensors["train_labels"].tolist() == list(range(200))
    assert tensors["test_labels"].tolist() == [3, 0]
    assert read_json(out / "meta.json")["class_names"][2] == f"thing {wnids[2]}"


def test_prepare_fashion_mnist_pads_to_32_and_checks_decompressed_md5(server, tmp_path):
    contents = fashion_idx()
    overrides = {}
    for key, filename in FASHION_FILES.items():
        serve(server, filename, gzip.compress(contents[key]))
        overrides[key] = {"md5": md5(contents[key])}
    out = prepare("fashion_mnist", tmp_path, mirror=server.base, files=overrides)
    images = load_tensors(out / "images.safetensors")["train_images"]
    assert images.shape == (30, 3, 32, 32)
    assert images[:, :, :2].eq(0).all() and images[:, :, :, -2:].eq(0).all()
    assert torch.equal(images[:, 0], images[:, 2])
    original = np.frombuffer(contents["train_images"], np.uint8, offset=16).reshape(30, 28, 28)
    assert torch.equal(images[:, 1, 2:30, 2:30], torch.from_numpy(original.copy()))


def test_system_offline_copy_that_does_not_verify_is_passed_over(server, tmp_path,
                                                                  monkeypatch, caplog):
    import dataclasses

    from dnnmod.data import DATASETS

    stale = tmp_path / "system"
    stale.mkdir()
    contents = fashion_idx()
    overrides = {}
    for key, filename in FASHION_FILES.items():
        (stale / filename).write_bytes(gzip.compress(b"another release"))
        serve(server, filename, gzip.compress(contents[key]))
        overrides[key] = {"md5": md5(contents[key])}
    monkeypatch.setitem(DATASETS, "fashion_mnist",
                        dataclasses.replace(DATASETS["fashion_mnist"], local_dir=stale))
    with caplog.at_level("WARNING"):
        out = prepare("fashion_mnist", tmp_path / "data", mirror=server.base, files=overrides)
    assert "not using the offline copy" in caplog.text
    assert read_json(out / "meta.json")["counts"] == {"train": 30, "test": 10}


def test_fashion_mnist_from_local_dir_with_recompressed_files(server, tmp_path):
    contents = fashion_idx()
    local = tmp_path / "debian"
    local.mkdir()
    for key, filename in FASHION_FILES.items():  # other compression level: other gz bytes
        (local / filename).write_bytes(gzip.compress(contents[key], compresslevel=1, mtime=0))
    overrides = {key: {"md5": md5(contents[key])} for key in FASHION_FILES}
    out = prepare("fashion_mnist", tmp_path / "data", files=overrides, local_dir=local)
    assert read_json(out / "meta.json")["counts"] == {"train": 30, "test": 10}
    assert server.log == [] and not (out / "raw").exists()

    overrides["test_labels"] = {"md5": "0" * 32}
    with pytest.raises(ChecksumError, match="decompressed content"):
        prepare("fashion_mnist", tmp_path / "other", files=overrides, local_dir=local)


def test_corrupted_archive_is_refused_and_nothing_written(server, tmp_path):
    archive, _ = cifar10_archive()
    corrupted = bytearray(archive)
    corrupted[len(archive) // 2] ^= 0xFF
    serve(server, "cifar-10-python.tar.gz", bytes(corrupted))
    with pytest.raises(ChecksumError, match=md5(archive)):
        prepare("cifar10", tmp_path, mirror=server.base, files={"archive": {"md5": md5(archive)}})
    assert not (tmp_path / "cifar10").exists()  # no empty raw/ folder either


def test_truncated_archive_that_passes_checksum_is_an_artifact_error(server, tmp_path):
    archive, _ = cifar10_archive()
    truncated = archive[: len(archive) * 2 // 3]
    serve(server, "cifar-10-python.tar.gz", truncated)
    with pytest.raises(ArtifactError, match=r"cifar-10-python\.tar\.gz"):
        prepare("cifar10", tmp_path, mirror=server.base,
                files={"archive": {"md5": md5(truncated)}})
    # The archive matched the overridden md5 but cannot be parsed: it is not kept either.
    assert not (tmp_path / "cifar10").exists()


class RunsShell:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_restricted_unpickler_refuses_code(server, tmp_path):
    payload = pickle.dumps({b"data": RunsShell()}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        ArrayUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(ArtifactError, match="system"):
        load_array_pickle(payload, "evil")

    archive = tar_gz({"cifar-10-batches-py/data_batch_1": payload})
    serve(server, "cifar-10-python.tar.gz", archive)
    with pytest.raises(ArtifactError, match="data_batch_1"):
        prepare("cifar10", tmp_path, mirror=server.base, files={"archive": {"md5": md5(archive)}})


def test_unknown_names_and_bad_overrides(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'imagenet'.*cifar10"):
        prepare("imagenet", tmp_path)
    with pytest.raises(UnknownNameError):
        load_dataset(tmp_path, "imagenet", seed=0)
    with pytest.raises(ConfigError, match="unknown files"):
        prepare("cifar10", tmp_path, files={"nope.tar": {"md5": "0"}})
    with pytest.raises(ConfigError, match="unknown options"):
        prepare("shapes", tmp_path, options={"colour": "red"})


def test_load_before_prepare_names_the_command(tmp_path):
    with pytest.raises(ArtifactError, match="dnnmod data prepare --dataset digits"):
        load_dataset(tmp_path, "digits", seed=0)


# ---------------------------------------------------------------- embedded datasets, splits, sets


def test_digits_and_shapes_are_deterministic(tmp_path):
    small = {"train_count": 200, "test_count": 50}
    for name, options in [("digits", None), ("shapes", small)]:
        first = load_tensors(prepare(name, tmp_path / "a", options=options) / "images.safetensors")
        again = load_tensors(prepare(name, tmp_path / "b", options=options) / "images.safetensors")
        assert first.keys() == again.keys()
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert first["train_images"].shape[1:] == (3, 32, 32)
    digits = read_json(tmp_path / "a" / "digits" / "meta.json")
    assert digits["counts"] == {"train": 1437, "test": 360}
    other = prepare("shapes", tmp_path / "c", options={**small, "seed": 1})
    other_images = load_tensors(other / "images.safetensors")["train_images"]
    assert other_images.shape == (200, 3, 32, 32) and not torch.equal(other_images,
                                                                      first["train_images"])
    assert torch.bincount(first["train_labels"]).tolist() == [20] * 10


def test_splits_are_deterministic_disjoint_and_cover_train(tmp_path):
    prepare("digits", tmp_path)
    labels = load_tensors(tmp_path / "digits" / "images.safetensors")["train_labels"]
    a = load_tensors(make_splits(tmp_path, "digits", seed=3))
    b = load_tensors(make_splits(tmp_path, "digits", seed=3))
    c = load_tensors(make_splits(tmp_path, "digits", seed=4))
    assert torch.equal(a["val_index"], b["val_index"])
    assert not torch.equal(a["val_index"], c["val_index"])
    everything = torch.cat([a["train_index"], a["val_index"]]).sort().values
    assert torch.equal(everything, torch.arange(len(labels)))
    val_per_class = torch.bincount(labels[a["val_index"]], minlength=10)
    assert torch.equal(val_per_class, torch.bincount(labels).mul(0.2).round().long())
    with pytest.raises(ConfigError):
        make_splits(tmp_path, "digits", seed=0, validation_fraction=1.5)


def test_load_dataset_subset_combine_and_normalisation(tmp_path):
    prepare("shapes", tmp_path, options={"train_count": 300, "test_count": 100})
    prepare("digits", tmp_path)
    shapes = load_dataset(tmp_path, "shapes", seed=0)
    digits = load_dataset(tmp_path, "digits", seed=0)
    assert (tmp_path / "shapes" / "splits" / "seed0.safetensors").is_file()
    assert (len(shapes.train), len(shapes.val), len(shapes.test)) == (240, 60, 100)

    x, y = shapes.train.float_batch(torch.arange(240))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.1)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=0.1)

    part = shapes.test.subset([7, 2])
    assert part.class_names == ["vertical_bar", "triangle"]
    assert len(part) == 20 and set(part.labels.tolist()) == {0, 1}
    original = shapes.test.labels[torch.isin(shapes.test.labels, torch.tensor([7, 2]))]
    assert torch.equal(part.labels, (original == 2).long())
    kept = shapes.test.subset([7, 2], relabel=False)
    assert set(kept.labels.tolist()) == {2, 7} and kept.num_classes == 10
    with pytest.raises(ConfigError):
        shapes.test.subset([10])

    task = combine([shapes.test.subset([0, 1, 2]), digits.test.subset([5])])
    assert task.class_names == ["circle", "square", "triangle", "5"]
    fives = int((digits.test.labels == 5).sum())
    assert torch.bincount(task.labels).tolist() == [10, 10, 10, fives]
    assert torch.equal(task.images[30:], digits.test.subset([5]).images)
    assert torch.equal(task.mean, shapes.test.mean)
    assert len(task.take(torch.tensor([0, 31]))) == 2
    assert shapes.subset([3, 4]).train.num_classes == 2


def test_split_is_remade_when_the_data_is_prepared_again(tmp_path):
    options = {"train_count": 100, "test_count": 10}
    prepare("shapes", tmp_path, options=options)
    first = load_dataset(tmp_path, "shapes", seed=0)
    prepare("shapes", tmp_path, options={**options, "seed": 5})
    second = load_dataset(tmp_path, "shapes", seed=0)
    assert len(second.val) == 20
    assert torch.bincount(second.val.labels).tolist() == [2] * 10
    assert not torch.equal(first.val.images, second.val.images)
    with pytest.raises(ConfigError, match="train_count"):
        prepare("shapes", tmp_path, options={"train_count": "many"})
