"""The one gate for untrusted files (`ddpm_plugin.trust`): what it refuses before reading or allocating."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from ddpm_plugin.trust import (
    UntrustedInputError,
    check_allocation,
    check_no_links,
    file_sha256,
    load_npz,
    memory_budget,
    npz_headers,
    read_json,
    regular_file,
    regular_files,
    write_atomically,
)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt", "a/../../outside.txt", "", "a\\b"])
def test_a_name_outside_the_folder_is_refused(tmp_path, name):
    (tmp_path / "outside.txt").write_text("secret")
    folder = tmp_path / "folder"
    (folder / "a").mkdir(parents=True)
    with pytest.raises(UntrustedInputError, match="relative path inside"):
        regular_file(folder, name)


def test_links_and_devices_are_refused_without_reading(tmp_path):
    (tmp_path / "real.txt").write_text("ok")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "sub").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(tmp_path / "fifo")
    assert regular_file(tmp_path, "real.txt") == tmp_path / "real.txt"
    for name in ("link.txt", "zero", "sub/real.txt"):
        with pytest.raises(UntrustedInputError, match="is a link"):
            regular_file(tmp_path, name)
    with pytest.raises(UntrustedInputError, match="not a regular file"):
        regular_file(tmp_path, "fifo")
    for path in ("/dev/zero", tmp_path / "fifo"):  # would never end / block forever if opened plainly
        with pytest.raises(UntrustedInputError, match="not a regular file"):
            file_sha256(path)
    with pytest.raises(UntrustedInputError):
        check_no_links(tmp_path)


def test_a_hub_cache_snapshot_is_read_through_its_blob_links_and_nothing_else(tmp_path):
    repo = tmp_path / "models--someone--model"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev" / "unet"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(repo / "blobs" / "abc123")
    assert [path.name for path in regular_files(repo / "snapshots" / "rev")] == ["config.json"]
    assert read_json(regular_file(repo / "snapshots" / "rev", "unet/config.json")) == {}
    (tmp_path / "secret").write_text("x")
    (snapshot / "other.json").symlink_to(tmp_path / "secret")  # a snapshot link out of the blob store
    with pytest.raises(UntrustedInputError, match="is a link"):
        check_no_links(repo / "snapshots" / "rev")


def test_npz_headers_are_read_without_decompressing_and_a_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        header = io.BytesIO()
        shape = (1 << 20, 1 << 20)  # 1 TiB of uint8 declared in a few bytes of header
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        archive.writestr("images.npy", header.getvalue())
    with pytest.raises(UntrustedInputError, match="damaged"):  # the stored size does not fit the header
        npz_headers(path)
    small = tmp_path / "small.npz"
    np.savez_compressed(small, images=np.zeros((3, 8, 8), np.uint8))
    assert npz_headers(small) == {"images": ((3, 8, 8), np.dtype(np.uint8))}
    with pytest.raises(ValueError, match="wrong"):
        load_npz(small, check=lambda headers: (_ for _ in ()).throw(ValueError("wrong shape")))
    assert load_npz(small)["images"].shape == (3, 8, 8)


def test_an_allocation_beyond_the_budget_is_refused_naming_it():
    check_allocation(1 << 20, "a small buffer")
    with pytest.raises(UntrustedInputError, match="`sample_size` 100000"):
        check_allocation(memory_budget() + 1, "config.json `sample_size` 100000")


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "report.json"
    write_atomically(path, '{"ok": 1}\n')

    def fail_midway(file):
        file.write(b'{"half')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(path, fail_midway)
    assert read_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
