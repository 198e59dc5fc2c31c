"""What the demo accepts from visitors, in-process: pictures within the pixel budget, checked before decoding, an
upload folder whose files live until their request ends, and picture inputs that read nothing but those uploads.
`test_demo_server.py` sends the same attacks to a real server."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from demo_attacks import JUNK_UPLOADS, decompression_bomb, small_picture

from ddpm_plugin.demo.uploads import (
    MAX_PENDING_UPLOADS,
    NOT_AN_UPLOAD,
    UPLOAD_TTL_SECONDS,
    RefusedUpload,
    UploadStore,
    check_picture,
    read_picture,
)

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="session")
def bomb(tmp_path_factory) -> Path:
    return decompression_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(bomb):
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with pytest.raises(RefusedUpload, match=r"Image is 13,000 x 13,000 pixels; the demo takes pictures of at most "
                                            r"4,194,304 pixels") as refused:
        read_picture("Image", bomb)
    assert refused.value.status == 413
    assert time.perf_counter() - started < 1.0 and psutil.Process().memory_info().rss - rss < 50 * 2**20


@pytest.mark.parametrize("name", sorted(JUNK_UPLOADS))
def test_files_that_are_not_pictures_are_refused_with_a_message(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(JUNK_UPLOADS[name])
    with pytest.raises(RefusedUpload, match="Image A is not a picture; upload a PNG, JPEG, WEBP, GIF, BMP image") as refused:
        read_picture("Image A", path)
    assert refused.value.status == 415


def test_a_picture_is_read_as_rgb(tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(small_picture(seed=3))
    array = read_picture("Image", path)
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8


def gradio_upload(root: Path, name: str, content: bytes) -> str:
    """A file where Gradio's upload route stores it: a folder named by the content's hash."""
    folder = root / f"sha{abs(hash(content))}"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)
    return str(folder / name)


def test_admitted_uploads_get_folders_of_their_own_and_are_discarded_after_use(tmp_path):
    store = UploadStore(tmp_path)
    picture = small_picture()
    first = store.admit([gradio_upload(tmp_path, "digit.png", picture)])
    second = store.admit([gradio_upload(tmp_path, "digit.png", picture)])  # the same picture from another visitor
    assert first != second and all(Path(p).read_bytes() == picture for p in first + second)
    assert all(store.holds(p) for p in first + second)
    assert not any(p.is_file() for p in tmp_path.glob("sha*/*"))  # moved out of Gradio's content-named folders
    store.discard(first[0])
    assert not Path(first[0]).exists() and Path(second[0]).is_file()
    generated = tmp_path / "abc" / "image.png"  # a picture the demo generated: never discarded
    generated.parent.mkdir()
    generated.write_bytes(picture)
    store.discard(generated)
    assert generated.is_file()


def test_a_refused_upload_is_deleted_with_everything_sent_alongside(tmp_path, bomb):
    store = UploadStore(tmp_path)
    paths = [gradio_upload(tmp_path, "ok.png", small_picture()), gradio_upload(tmp_path, "page.html", JUNK_UPLOADS["page.html"])]
    with pytest.raises(RefusedUpload, match="The upload 'page.html' is not a picture"):
        store.admit(paths)
    shutil.copyfile(bomb, tmp_path / "bomb.png")
    with pytest.raises(RefusedUpload, match="The upload 'bomb.png' is 13,000 x 13,000 pixels"):
        store.admit([str(tmp_path / "bomb.png")])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_unused_uploads_expire_and_their_number_is_bounded(tmp_path):
    store = UploadStore(tmp_path)
    (old,) = store.admit([gradio_upload(tmp_path, "old.png", small_picture(1))])
    stale = time.time() - UPLOAD_TTL_SECONDS - 1
    os.utime(Path(old).parent, (stale, stale))
    (fresh,) = store.admit([gradio_upload(tmp_path, "new.png", small_picture(2))])
    assert not Path(old).exists() and Path(fresh).is_file()
    for k in range(MAX_PENDING_UPLOADS - 1):
        (store.folder / f"pending-{k}").mkdir()
    with pytest.raises(RefusedUpload, match="too many unused uploads") as refused:
        store.admit([gradio_upload(tmp_path, "one-more.png", small_picture(3))])
    assert refused.value.status == 503


def test_check_picture_reads_only_the_header(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(small_picture()[:60])  # a valid header, then nothing
    check_picture("Image", path)  # the header alone is fine ...
    with pytest.raises(RefusedUpload, match="Image cannot be decoded"):
        read_picture("Image", path)  # ... decoding is not


def test_a_picture_input_reads_an_admitted_upload_and_nothing_else(tmp_path):
    (tmp_path / "run").mkdir()
    store = UploadStore(tmp_path / "run")
    (upload,) = store.admit([gradio_upload(store.root, "digit.png", small_picture(seed=4))])
    assert store.read("Image", {"path": upload, "meta": {"_type": "gradio.FileData"}}).shape == (24, 24, 3)
    with pytest.raises(ValueError, match="Image: upload an image first"):
        store.read("Image", None)
    outside = tmp_path / "secret.png"
    outside.write_bytes(small_picture(seed=5))
    generated = store.root / "abc" / "image.png"  # a picture the demo generated: not an upload
    generated.parent.mkdir()
    generated.write_bytes(small_picture(seed=6))
    linked = store.folder / "linked" / "digit.png"
    linked.parent.mkdir()
    linked.symlink_to(outside)
    fifo = store.folder / "fifo" / "digit.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    store.discard(upload)
    hostile = [str(outside), "secret.png", "/etc/passwd", "/etc/shadow", str(tmp_path / "missing.png"), "",
               f"{store.folder}/../../secret.png", str(generated), str(linked), str(fifo), upload, 7, ["x"]]
    for value in hostile:
        for wrapped in (value, {"path": value}):
            with pytest.raises(ValueError) as refused:
                store.read("Image B", wrapped)
            assert str(refused.value) == NOT_AN_UPLOAD.format(name="Image B"), value


def test_a_gallery_picture_is_adopted_as_an_upload_and_no_other_path(tmp_path):
    store = UploadStore(tmp_path / "run")
    generated = store.root / "abc" / "image.png"
    generated.parent.mkdir(parents=True)
    generated.write_bytes(small_picture(seed=6))
    adopted = store.adopt(str(generated))
    assert store.holds(adopted) and Path(adopted).read_bytes() == generated.read_bytes()
    assert store.read("Image", adopted).shape == (24, 24, 3)
    outside = tmp_path / "secret.png"
    outside.write_bytes(small_picture(seed=5))
    for path in (str(outside), "/etc/passwd", f"{store.root}/../secret.png", None):
        with pytest.raises(ValueError, match="Use a picture of the gallery above"):
            store.adopt(path)
