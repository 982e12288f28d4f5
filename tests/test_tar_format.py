"""udfs.download.tar_format and the shard writer against tarfile itself: the same bytes for the
same members, and archives tarfile and the webdataset reader read back."""

from __future__ import annotations

import io
import tarfile

import pytest

from udfs.download import tar_format
from udfs.download.shard_writer import TarShardWriter, iter_samples


def _tarfile_bytes(members: list[tuple[str, bytes]], mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("000000000.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("000000000.txt", "une légende ✓".encode()),
           ("000000000.json", b"{}"), ("000000001.jpg", b""), ("000000001.txt", b"x" * 512),
           ("dir/ß-" + "n" * 80 + ".txt", b"long-ish name, still under 100 bytes"),
           ("d" * 60 + "/" + "p" * 60 + ".txt", b"a name past 100 bytes: tarfile's prefix field")]


@pytest.mark.parametrize("mtime", [0, 1_796_160_000])
def test_members_are_the_bytes_tarfile_writes(mtime):
    ours = b"".join(tar_format.member(name, data, mtime) for name, data in MEMBERS)
    offset = len(ours)
    ours += tar_format.end_of_archive(offset)
    assert ours == _tarfile_bytes(MEMBERS, mtime)
    for name, data in MEMBERS:
        assert len(tar_format.ustar_header(name, len(data), mtime)) == tar_format.BLOCK


def test_end_of_archive_fills_the_last_record():
    for offset in (0, 512, 9216, 9728, 10240, 20480 - 1024):
        assert (offset + len(tar_format.end_of_archive(offset))) % tar_format.RECORD == 0
        assert len(tar_format.end_of_archive(offset)) >= 2 * tar_format.BLOCK


def test_shard_writer_output_reads_back_with_tarfile_and_the_sample_reader(tmp_path):
    uri = str(tmp_path / "00000.tar")
    samples = [(f"{i:09d}", {"jpg": bytes([i]) * (100 * i + 1), "txt": f"caption {i}".encode(), "json": b"{}"})
               for i in range(30)]
    with TarShardWriter(uri) as writer:
        for key, files in samples:
            writer.write(key, files)
    data = (tmp_path / "00000.tar").read_bytes()
    assert writer.bytes_written == len(data) and len(data) % tar_format.RECORD == 0
    with tarfile.open(uri) as tar:
        names = tar.getnames()
        assert tar.extractfile(f"{29:09d}.jpg").read() == samples[29][1]["jpg"]
    assert names == [f"{k}.{ext}" for k, files in samples for ext in files]
    assert [s["__key__"] for s in iter_samples(uri)] == [k for k, _ in samples]
    assert [s["txt"] for s in iter_samples(uri)] == [f["txt"] for _, f in samples]
