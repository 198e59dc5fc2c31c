"""What the demo accepts from visitors, in-process: pictures within the pixel budget, checked before decoding, and
an upload folder whose files live until their request ends (issue 11, items 4-5). `test_demo_server.py` sends
the same attacks to a real server."""

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


def test_a_picture_is_read_as_rgb_and_a_missing_one_named(tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(small_picture(seed=3))
    array = read_picture("Image", path)
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8
    with pytest.raises(ValueError, match="Image: upload an image first"):
        read_picture("Image", None)
    with pytest.raises(ValueError, match="Image B: the upload was used by an earlier request and deleted"):
        read_picture("Image B", tmp_path / "gone.png")


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
