"""The datasets the pipeline knows how to obtain, and every form in which each may be found.

A dataset has one official source (URL, archive member, checksum where the publisher gives one) and any number of
*mirror layouts*: files looked for, in order, under a local mirror folder. A mirror may hold the official archives
or the offline copies common in the literature (GroupLens ``u.data``, the SASRec ``user item`` pair format, the
S3Rec ``user item item ...`` sequence format). The first layout present wins, so a complete official file is always
preferred over a partial derived one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.events import TimestampWindow
from pipeline.data.quarantine import BadInputError, ReadResult
from pipeline.data.readers import read_delimited, read_gsasrec_prefixes, read_jsonl, read_user_sequences

Reader = Callable[[list[Path], TimestampWindow], ReadResult]  # files, valid event times -> events


@dataclass(frozen=True)
class Layout:
    """One way a dataset can sit in a folder: the relative paths it needs and how to read them."""

    name: str
    files: tuple[str, ...]
    read: Reader
    complete: bool = True  # False for copies known to miss events (logged as a warning)
    note: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str | None
    archive: str | None  # file name of the official download
    checksum: str | None  # "md5:<hex>" / "sha256:<hex>" published by the source; None -> sha256 recorded
    read_archive: Reader | None
    mirror_layouts: tuple[Layout, ...] = field(default_factory=tuple)
    citation: str = ""


def _zip_member(archive: Path, member: str) -> Path:
    """Extract one archive member next to the archive (idempotent) and return its path."""
    target = archive.parent / f"{archive.stem}-extracted" / member
    if not target.exists():
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise BadInputError(f"{archive} does not contain {member}; is it the right archive?")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(zf.read(member))
            tmp.replace(target)
    return target


def _ml1m_ratings(paths: list[Path], window: TimestampWindow) -> ReadResult:
    fields = ["user_id", "item_id", "rating", "timestamp"]
    return read_delimited(paths[0], fields, "::", encoding="latin-1", window=window)


def _ml100k_ratings(paths: list[Path], window: TimestampWindow) -> ReadResult:
    return read_delimited(paths[0], ["user_id", "item_id", "rating", "timestamp"], "\t", window=window)


def _sasrec_pairs(paths: list[Path], window: TimestampWindow) -> ReadResult:
    return read_delimited(paths[0], ["user_id", "item_id"], None, window=window)


def _amazon_reviews(paths: list[Path], window: TimestampWindow) -> ReadResult:
    columns = {"user_id": "reviewerID", "item_id": "asin", "rating": "overall", "timestamp": "unixReviewTime"}
    return read_jsonl(paths[0], columns, integer_ids=False, window=window)


def _gsasrec_prefixes(paths: list[Path], window: TimestampWindow) -> ReadResult:
    return read_gsasrec_prefixes(*paths, window=window)


def _sequences(paths: list[Path], window: TimestampWindow) -> ReadResult:
    return read_user_sequences(paths[0], window=window)


def _sequences_with_time(paths: list[Path], window: TimestampWindow) -> ReadResult:
    return read_user_sequences(paths[0], timestamps_path=paths[1], window=window)


GSASREC_FILES = tuple(
    f"ml-1m/gsasrec_splits/{name}.txt" for name in ("train_input", "val_input", "val_output", "test_output")
)
ML1M_PREFIXES_NOTE = (
    "gSASRec split of SASRec's ML-1M (no timestamps, line order = time order): 988,555 of 999,611 events; "
    "the 512 validation users whole, the other 5,528 without their last two events (the second-to-last is in "
    "no file), so every history is gapless"
)
ML1M_PARTIAL_NOTE = (
    "SASRec-format ML-1M copy with 994,083 of 999,611 events and no timestamps (line order = time order); "
    "5,528 users lack their second-to-last event, so their test history has a hole right before the target "
    "and test scores fall well below validation (prefer the gSASRec split files)"
)

REGISTRY: dict[str, DatasetSpec] = {
    "ml-1m": DatasetSpec(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        archive="ml-1m.zip",
        checksum="md5:c4d9eecfca2ab87c1945afe126590906",  # GroupLens ml-1m.zip.md5
        read_archive=lambda p, window: _ml1m_ratings([_zip_member(p[0], "ml-1m/ratings.dat")], window),
        mirror_layouts=(
            Layout("ratings.dat", ("ml-1m/ratings.dat",), _ml1m_ratings),
            Layout("sasrec-full", ("ml-1m/ml-1m.txt",), _sasrec_pairs),
            Layout("gsasrec-prefixes", GSASREC_FILES, _gsasrec_prefixes, complete=False, note=ML1M_PREFIXES_NOTE),
            Layout(
                "sasrec-partial",
                ("ml-1m/ml-1m_sasrec_format_partial.txt.gz",),
                _sasrec_pairs,
                complete=False,
                note=ML1M_PARTIAL_NOTE,
            ),
        ),
        citation="F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets. ACM TiiS 5(4).",
    ),
    "ml-100k": DatasetSpec(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        archive="ml-100k.zip",
        checksum="md5:0e33842e24a9c977be4e0107933c0723",  # GroupLens ml-100k.zip.md5
        read_archive=lambda p, window: _ml100k_ratings([_zip_member(p[0], "ml-100k/u.data")], window),
        mirror_layouts=(Layout("u.data", ("ml-100k/u.data",), _ml100k_ratings),),
        citation="F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets. ACM TiiS 5(4).",
    ),
    "beauty": DatasetSpec(
        name="beauty",
        url="http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
        archive="reviews_Beauty_5.json.gz",
        checksum=None,  # not published: the sha256 of what was fetched is recorded in the manifest
        read_archive=_amazon_reviews,
        mirror_layouts=(
            Layout("raw", ("amazon-beauty/reviews_Beauty_5.json.gz",), _amazon_reviews),
            Layout(
                "s3rec",
                ("amazon-beauty/s3rec/Beauty.txt",),
                _sequences,
                note="S3Rec 5-core sequences (integer ids, line order = time order)",
            ),
            Layout(
                "ticoserec",
                (
                    "amazon-beauty/ticoserec/Beauty_item_org_rank.txt",
                    "amazon-beauty/ticoserec/Beauty_time_org_rank.txt",
                ),
                _sequences_with_time,
                note="TiCoSeRec 5-core sequences with day-resolution timestamps",
            ),
        ),
        citation="R. He and J. McAuley. 2016. Ups and downs. WWW; J. McAuley et al. 2015. SIGIR.",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise BadInputError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}, custom, synthetic")
    return REGISTRY[name]
