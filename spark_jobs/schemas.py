"""Declared schemas of the datasets between stages.

A dataset has a name, a schema and a partitioning; no stage infers a schema. Readers check the
columns they need against these declarations (`datasets.read_dataset`), so a stage fed the wrong
dataset fails with a message naming the missing or mistyped columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import types as T


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    schema: T.StructType
    partition_by: tuple[str, ...] = ()
    description: str = ""
    # Columns a reader needs; None means all of `schema`.
    required: tuple[str, ...] | None = field(default=None)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return self.required if self.required is not None else tuple(self.schema.fieldNames())


def _s(name: str) -> T.StructField:
    return T.StructField(name, T.StringType(), True)


def _l(name: str) -> T.StructField:
    return T.StructField(name, T.LongType(), True)


# --- stage 1: wat_extract -------------------------------------------------------------------------

WAT_PAIRS = DatasetSpec(
    name="wat_pairs",
    description="image/alt-text pairs found in Common Crawl WAT (or WARC) files",
    schema=T.StructType([
        _s("uid"),            # 16 hex chars, udfs.ids.pair_uid(url, text): stable across runs
        _s("url"),            # absolute http(s) image URL
        _s("text"),           # alt-text, whitespace-normalised and length-capped
        _s("page_url"),       # WARC-Target-URI of the page the image is on
        _s("source_file"),    # the WAT/WARC file the pair came from
        _s("record_id"),      # WARC-Record-ID of the metadata/response record
        _s("record_date"),    # WARC-Date of the record
        T.StructField("alt_truncated", T.BooleanType(), True),
        _s("page_opt_out"),   # the page's opt-out meta (robots=noai, tdm-reservation=1, ...), else null
        _s("crawl"),          # partition: CC-MAIN-YYYY-WW parsed from the path, else "unknown"
    ]),
    partition_by=("crawl",),
    required=("uid", "url", "text"),
)

REJECT_COLUMNS = (_s("status"), _s("error_message"))

WAT_REJECTED = DatasetSpec(
    name="wat_rejected",
    description="image links (level=link) and whole records (level=record) that wat_extract saw "
                "and did not keep, with their reason",
    schema=T.StructType([
        _s("url"), _s("text"), _s("page_url"), _s("source_file"), _s("record_id"),
        *REJECT_COLUMNS,
        # link: one image link (missing_url, bad_url, not_http, missing_alt, empty_alt,
        # alt_too_short); record: a whole record (invalid_json, missing_fields, bad_html) or a
        # record lost to damage (garbage_before_record, bad_gzip_member, bad_record_header, ...)
        # or read despite damage (bad_record: lying Content-Length, body that does not decode)
        _s("level"),
        _s("crawl"),
    ]),
    partition_by=("status",),
)

WAT_FILE_OUTCOMES = DatasetSpec(
    name="wat_file_outcomes",
    description="one row per input file: what happened to it",
    schema=T.StructType([
        _s("source_file"),
        _s("status"),           # ok | partial (pairs before the problem kept) | failed
        _s("error_message"),    # "<reason>: <detail>", reason in file_not_found, open_failed,
                                # empty_file, not_warc, bad_gzip, truncated_gzip, unreadable
        _l("records_read"),
        _l("metadata_records"),
        _l("html_records"),
        _l("links_seen"),
        _l("pairs_kept"),
        _l("pairs_rejected"),     # link-level rejects: links_seen = pairs_kept + pairs_rejected
        _l("records_rejected"),   # record-level rejects (invalid JSON, missing fields)
        _l("records_non_utf8"),   # payloads read with U+FFFD replacement (their pairs are kept)
        _l("alt_truncated"),      # kept pairs whose alt-text was cut to max_alt_length
        T.StructField("seconds", T.DoubleType(), True),
        _l("compressed_bytes"),
        # every record accounted for (issue 12): records_read = sum(records_by_type); what could
        # not be read is in records_lost by reason (udfs.extract.wat.FileOutcome, udfs.extract.warc_records)
        T.StructField("records_by_type", T.MapType(T.StringType(), T.LongType()), True),
        _l("records_not_html"),
        _l("records_lost"),
        T.StructField("lost_reasons", T.MapType(T.StringType(), T.LongType()), True),
        _l("bytes_skipped"),
        _l("records_bad_date"),         # unparsable WARC-Date: record kept, record_date null
        _l("records_charset_detected"),
        T.StructField("quirks", T.MapType(T.StringType(), T.LongType()), True),
        _s("reader_used"),              # fastwarc | warcio | tolerant | fastwarc+tolerant
        _s("archive_format"),           # warc | arc
        _s("compression"),              # gzip | zstd | none
        # records read although damaged (lying Content-Length, body that does not decode), each
        # also a rejected row with status bad_record
        _l("records_damaged"),
        T.StructField("damage_reasons", T.MapType(T.StringType(), T.LongType()), True),
    ]),
)


# --- stage 2: dedup -------------------------------------------------------------------------------

# dedup's output is WAT_PAIRS itself (same schema, same partitioning): later stages read it as such.

DEDUP_REJECTED = DatasetSpec(
    name="dedup_rejected",
    description="pairs dedup dropped: status duplicate (error_message names the kept uid), "
                "seen_before (in the seen-pairs Bloom filter) or failed_before (URL in the failed-URL filter)",
    schema=T.StructType([*WAT_PAIRS.schema.fields[:-1], *REJECT_COLUMNS, WAT_PAIRS.schema["crawl"]]),
    partition_by=("status",),
)


# --- stage 3: download ----------------------------------------------------------------------------

def _i(name: str) -> T.StructField:
    return T.StructField(name, T.IntegerType(), True)


DOWNLOAD_INPUT = DatasetSpec(
    name="download_input",
    description="any parquet with url and text (uid, page_url and page_opt_out are used when present)",
    schema=T.StructType([_s("uid"), _s("url"), _s("text"), _s("page_url"), _s("page_opt_out")]),
    required=("url", "text"),
)

IMAGES_METADATA = DatasetSpec(
    name="images_metadata",
    description="one row per input row of a download shard: <images>/{shard:05d}.parquet "
                "(read with the glob <images>/*.parquet), written by udfs.download.download_worker",
    schema=T.StructType([
        _s("key"),              # {shard:05d}{index:04d}: the sample's name in the tar
        _s("uid"), _s("url"), _s("text"), _s("page_url"),
        _i("shard"),
        _s("status"),           # success | failed_to_download | failed_to_decode | too_small | too_large |
                                # opted_out | blocked_address | bad_content_type | invalid_url |
                                # blocked_content (sha256 in download.blocked_sha256; no bytes kept)
                                # | taken_down (clipcrawl takedown: url, uid, key and shard kept, nothing else)
        _s("error_message"),
        _i("http_status"),
        _s("content_type"),
        _i("original_width"), _i("original_height"), _i("width"), _i("height"),
        _l("bytes"),            # size of the original download
        _s("sha256"),           # of the original bytes
        T.StructField("download_seconds", T.DoubleType(), True),
        T.StructField("retryable", T.BooleanType(), True),   # a later --retry-failed run re-attempts it
        _i("attempts"),         # HTTP attempts made (retries included)
        _i("exif_orientation"),  # EXIF orientation tag of the original (1-8; null: none); stored upright
        _s("opt_out_source"),   # opted_out rows: x_robots_tag | robots_txt | tdmrep | page_meta | opt_out_list
        _l("phash"),            # 64-bit pHash of the decoded original (udfs.download.image_hash, signed); null unless success
        _s("stored_sha256"),    # of the bytes stored in the tar as KEY.<ext> (after resize); null unless success
        _l("image_offset"),     # where KEY.<ext>'s bytes start in the tar, and their size: export copies
        _l("image_size"),       # them by range (a takedown's rewrite moves them: export checks the header)
    ]),
    # columns added after the first release (exif_orientation, opt_out_source) are optional on read:
    # older shards lack them and conform fills nulls
    required=("key", "uid", "url", "text", "page_url", "shard", "status", "error_message", "http_status",
              "content_type", "original_width", "original_height", "width", "height", "bytes", "sha256",
              "download_seconds", "retryable", "attempts"),
)


# --- stage 3b: image_dedup -----------------------------------------------------------------------

IMAGE_DEDUP = DatasetSpec(
    name="image_dedup",
    description="image-dedup output: every images_metadata row, duplicates of another image marked "
                "duplicate_image (same sha256) or near_duplicate (pHash within image_dedup.phash_distance); "
                "clip-score reads it and takes the tars from the download folder named in its stats",
    schema=T.StructType([
        *IMAGES_METADATA.schema.fields,
        _s("record_date"),        # joined from the download input by uid (null when it has none)
        _s("duplicate_of_uid"),   # the kept row of the duplicate's group
        _s("duplicate_of_key"),
        _i("phash_distance"),     # near_duplicate: Hamming distance to the kept row's pHash
    ]),
    required=("key", "uid", "url", "text", "status", "shard"),
)


# --- stage 5: filter ------------------------------------------------------------------------------

def _d(name: str) -> T.StructField:
    return T.StructField(name, T.DoubleType(), True)


FILTER_INPUT = DatasetSpec(
    name="filter_input",
    description="clip_score output (contract 3): the columns the filter reads",
    schema=T.StructType([
        _s("uid"), _s("key"), _s("url"), _s("text"), _s("status"), _s("error_message"),
        _d("similarity"), _d("similarity_multilingual"),
        T.StructField("image_embedding", T.BinaryType(), True),
        T.StructField("text_embedding", T.BinaryType(), True),
        _s("tar_path"),
        T.StructField("original_width", T.IntegerType(), True),
        T.StructField("original_height", T.IntegerType(), True),
        T.StructField("width", T.IntegerType(), True),
        T.StructField("height", T.IntegerType(), True),
        _l("phash"),            # eval decontamination compares it with the eval images' pHash
        _l("image_offset"), _l("image_size"),
    ]),
    # SCORED (stage 4) guarantees these; the others are filled with nulls when absent.
    required=("uid", "key", "url", "text", "status", "similarity", "image_embedding", "text_embedding"),
)

SUBSET = DatasetSpec(
    name="subset",
    # Not hive-partitioned: LAION published flat parquet files with LANGUAGE as a column, and a
    # LANGUAGE=... partitioning would type the all-null nolang subset as `void` on read. Rows are
    # sorted by LANGUAGE within each file instead, so parquet min/max statistics prune by language.
    description="one LAION subset (laion2B-en / laion2B-multi / laion1B-nolang): kept pairs with "
                "LAION's published columns, flat parquet sorted by LANGUAGE within each file",
    schema=T.StructType([
        _l("SAMPLE_ID"),        # udfs.ids.uid_to_int64(uid)
        _s("URL"), _s("TEXT"),
        T.StructField("HEIGHT", T.IntegerType(), True),   # original image size (before resize)
        T.StructField("WIDTH", T.IntegerType(), True),
        _d("similarity"),       # the score the threshold was applied to (multilingual model for non-en when configured)
        _s("LANGUAGE"),         # ISO 639-1 code from filter.language_detector; null in the nolang subset
        _d("punsafe"),          # safety head probability; null when filter.punsafe_head is null
        _d("pwatermark"),       # null when filter.pwatermark_head is null
        _l("hash"),             # = SAMPLE_ID: the 64-bit hash of url + text, to join subsets
        _s("key"),              # the sample's key in its webdataset shard
        _s("tar_path"),         # URI of that shard
        _d("language_confidence"),  # the detector's confidence in LANGUAGE (also in nolang): re-split offline
        _l("image_offset"),     # the image's bytes in tar_path (download's image_offset / image_size):
        _l("image_size"),       # export copies them without reading the tar's headers; null in older runs
    ]),
    # subsets written before image_offset / image_size existed lack them (export then reads the tars' headers)
    required=("SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "similarity", "LANGUAGE", "punsafe", "pwatermark",
              "hash", "key", "tar_path", "language_confidence"),
)

FILTER_REJECTED = DatasetSpec(
    name="filter_rejected",
    description="rows of the clip_score output the filter did not keep: below_threshold (score, "
                "threshold and language), not_scored, or their earlier status (failed_to_download, ...)",
    schema=T.StructType([
        _s("uid"), _s("key"), _s("url"), _s("text"),
        _d("similarity"), _d("similarity_multilingual"),
        _d("score"),            # the similarity the threshold was applied to
        _d("threshold"),
        _s("LANGUAGE"), _d("language_confidence"),
        _s("bucket"),           # en | multi | nolang (null unless scored)
        _s("tar_path"),
        *REJECT_COLUMNS,
    ]),
    partition_by=("status",),
)


# --- stage 4: clip_score --------------------------------------------------------------------------

SCORED = DatasetSpec(
    name="scored",
    description="clip_score output (contract 3): every images_metadata row, success rows with their "
                "CLIP similarity and normalised embeddings; <scored>/{img_emb,text_emb,metadata}/ hold "
                "the same scored rows in clip-retrieval's layout",
    schema=T.StructType([
        *IMAGES_METADATA.schema.fields,
        T.StructField("similarity", T.DoubleType(), True),               # cosine; null unless scored
        T.StructField("similarity_multilingual", T.DoubleType(), True),  # null unless a multilingual model is set
        T.StructField("image_embedding", T.BinaryType(), True),  # little-endian float16, L2-normalised
        T.StructField("text_embedding", T.BinaryType(), True),   # (udfs.clip.embeddings.encode / decode)
        _s("tar_path"),         # URI of the shard tar holding the sample (null when it is not in one)
    ]),
    partition_by=("status",),
    required=("key", "uid", "url", "text", "status", "similarity", "image_embedding", "text_embedding"),
)

# --- stage 6: knn_index ---------------------------------------------------------------------------

INDEX_IDS = DatasetSpec(
    name="index_ids",
    description="<indices>/<subset>/ids.parquet: faiss index id -> the subset row it stands for "
                "(written by udfs.index.layout.write_ids with pyarrow, one row group per embeddings part)",
    schema=T.StructType([
        _l("index_id"),         # row number in the order autofaiss read the npy files (path order)
        _l("SAMPLE_ID"),
        _s("URL"),
        _s("TEXT"),
        T.StructField("similarity", T.DoubleType(), True),
        _s("LANGUAGE"),
        T.StructField("punsafe", T.DoubleType(), True),
        T.StructField("pwatermark", T.DoubleType(), True),
        _s("key"),              # sample key in its shard
        _s("tar_path"),         # URI of the shard tar (thumbnails are read from it)
        T.StructField("WIDTH", T.IntegerType(), True),    # original image size (serve's size filter)
        T.StructField("HEIGHT", T.IntegerType(), True),
    ]),
    required=("index_id", "URL", "TEXT"),
)

# --- export ---------------------------------------------------------------------------------------

EXPORT_MANIFEST = DatasetSpec(
    name="export_manifest",
    description="<export>/manifest/: one row per subset row the export selected (after --where and "
                "--limit): the shard it is in, or why it is in none (its image missing from its source shard)",
    schema=T.StructType([
        _s("key"),              # the sample's key, in the export shard as in the source shard
        _l("SAMPLE_ID"),
        _i("shard"),            # export shard number (null when not exported)
        _s("shard_file"),       # {shard:05d}.tar or .parquet
        _l("position"),         # 0-based place in the export order (shard = position // export.shard_size)
        _s("tar_path"),         # the source download shard
        _s("status"),           # success | missing_image (error_message: not in the shard / the shard unreadable)
        _s("error_message"),
    ]),
)
