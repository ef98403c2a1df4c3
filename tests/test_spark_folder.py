"""Logs written by Spark: folders of part files whose footers cannot carry the `nar4rec` key,
described by one `_nar4rec.json` sidecar, with Spark's types, validated and trained on."""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec.cli import main
from nar4rec.config import RunConfig, load_overrides
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import METADATA_KEY, SIDECAR_FILE, read_spec
from nar4rec.data.loader import RequestLoader
from nar4rec.data.validate import check_file
from nar4rec.errors import DataError
from nar4rec.evaluation import evaluate_run
from nar4rec.runs import split_files, train_run

pytestmark = pytest.mark.usefixtures("one_thread")

SPARK_ROW_METADATA = b"org.apache.spark.sql.parquet.row.metadata"
TINY = ["train.epochs=1", "train.steps_per_epoch=4", "train.batch_size=64", "dnn.d_model=16"]


def spark_types(table: pa.Table, timestamps: str) -> pa.Table:
    """The simulator's table as `df.write.parquet` writes the same Spark DataFrame: every
    field nullable, lists of "element"s, doubles for most numbers, IntegerType user ids, an
    IntegerType and a StringType categorical, and no schema metadata. `timestamps`: "micros"
    (spark.sql.parquet.outputTimestampType=TIMESTAMP_MICROS, read back as
    timestamp[us, tz=UTC]) or "int96" (Spark's default, converted when written)."""
    retype = {
        "user_id": pa.int32(),
        "user_cat_segment": pa.string(),
        "user_cat_activity_level": pa.int32(),
        "upstream_score": pa.list_(pa.field("element", pa.float64())),
        "cand_cat_topic": pa.list_(pa.field("element", pa.string())),
        "log_propensity": pa.float64(),
    }
    fields = []
    for field in table.schema:
        name, type_ = field.name, retype.get(field.name, field.type)
        if name.startswith("user_num_"):
            type_ = pa.float64()
        elif name.startswith("feedback_"):
            type_ = pa.list_(pa.field("element", pa.float64()))
        elif name == "timestamp" and timestamps == "micros":
            type_ = pa.timestamp("us", tz="UTC")
        fields.append(pa.field(name, type_, nullable=True))
    return table.cast(pa.schema(fields))


def write_like_spark(table: pa.Table, folder, *, parts: int, timestamps: str,
                     sidecar: dict | None) -> list:
    """`table` written into `folder` as Spark lays out a DataFrame write: part files with
    Spark's names and types, `_SUCCESS`, hidden `.crc` checksums, and (from the job's last
    lines) the `_nar4rec.json` sidecar."""
    folder.mkdir(parents=True)
    table = spark_types(table, timestamps)
    job = uuid.uuid5(uuid.NAMESPACE_URL, folder.name)                    # the write's id
    paths = []
    row_metadata = {"type": "struct", "fields": [            # abridged: names only
        {"name": name, "nullable": True, "metadata": {}} for name in table.column_names]}
    for index, rows in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        path = folder / f"part-{index:05d}-{job}-c000.snappy.parquet"
        with pq.ParquetWriter(path, table.schema, compression="snappy", store_schema=False,
                              use_deprecated_int96_timestamps=timestamps == "int96") as writer:
            writer.write_table(table.slice(int(rows[0]), len(rows)))
            writer.add_key_value_metadata({SPARK_ROW_METADATA: json.dumps(row_metadata)})
        (folder / f".{path.name}.crc").write_bytes(b"crc\x00\x01")
        paths.append(path)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "._SUCCESS.crc").write_bytes(b"crc")
    if sidecar is not None:
        (folder / SIDECAR_FILE).write_text(json.dumps(sidecar))
    return paths


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=1500, n_candidates=20, list_length=5)
    return out


def footer_json(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


@pytest.fixture(scope="module")
def spark_data(sim, tmp_path_factory):
    """The simulated splits as Spark folders (train with INT96 timestamps, valid and test with
    TIMESTAMP_MICROS), beside the simulator's truth so that evaluation knows the utility."""
    data = tmp_path_factory.mktemp("spark") / "data"
    for split, parts, timestamps in (("train", 3, "int96"), ("valid", 2, "micros"),
                                     ("test", 2, "micros")):
        write_like_spark(pq.read_table(sim / f"{split}.parquet"), data / split, parts=parts,
                         timestamps=timestamps, sidecar=footer_json(sim / f"{split}.parquet"))
    shutil.copytree(sim / "truth", data / "truth")
    shutil.copy(sim / "summary.json", data / "summary.json")
    return data


def test_a_spark_folder_has_spark_types_and_validates(spark_data, sim, tmp_path, capsys):
    parts = split_files(spark_data, "train")
    assert [p.name[:10] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    schema = pq.read_schema(parts[0])
    assert METADATA_KEY not in schema.metadata and SPARK_ROW_METADATA in schema.metadata
    assert schema.field("timestamp").type == pa.timestamp("ns")                 # INT96
    assert pq.read_schema(split_files(spark_data, "test")[0]).field("timestamp").type == \
        pa.timestamp("us", tz="UTC")
    assert schema.field("item_id").type == pa.list_(pa.field("element", pa.int64()))
    assert schema.field("user_cat_segment").type == pa.string()
    assert schema.field("user_id").type == schema.field("user_cat_activity_level").type == \
        pa.int32()
    assert all(f.nullable for f in schema)
    assert read_spec(parts[0]) == read_spec(sim / "train.parquet")

    for split in ("train", "test"):
        summary = tmp_path / f"{split}.json"
        assert main(["validate", str(spark_data / split), "--json", str(summary)]) == 0
        totals = json.loads(summary.read_text())
        assert totals["problems"] == 0
        assert totals["requests"] == pq.ParquetFile(sim / f"{split}.parquet").metadata.num_rows
        assert sorted(totals["files"]) == [p.name for p in split_files(spark_data, split)]
        original = check_file(sim / f"{split}.parquet").counts
        assert totals["exposures"] == original.exposures
        assert totals["positives"] == original.positives
    out = capsys.readouterr().out
    assert "_SUCCESS" not in out and ".crc" not in out


def test_a_folder_lists_its_parts_only(tmp_path):
    for name in ("part-00001-x-c000.snappy.parquet", "part-00000-x-c000.snappy.parquet",
                 "shard.parquet", "_common_metadata.parquet", ".part-00002-x.parquet",
                 ".part-00000-x-c000.snappy.parquet.crc", "_SUCCESS", SIDECAR_FILE):
        (tmp_path / "train" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"")
    (tmp_path / "train" / "_temporary.parquet").mkdir()
    assert [p.name for p in split_files(tmp_path, "train")] == [
        "part-00000-x-c000.snappy.parquet", "part-00001-x-c000.snappy.parquet", "shard.parquet"]


def test_spark_types_encode_as_the_original_files_do(spark_data, sim):
    """The feature space fitted on the Spark folder holds the same vocabularies (values as
    text) and numeric statistics as the one fitted on the simulator's own file, and the
    loader reads every request of every part."""
    ours = FeatureSpace.fit([sim / "train.parquet"])
    theirs = FeatureSpace.fit(split_files(spark_data, "train"))
    assert theirs.spec == ours.spec
    for name in ours.user_cat:
        assert sorted(map(str, theirs.user_cat[name].values)) == \
            sorted(map(str, ours.user_cat[name].values))
    for name in ours.cand_cat:
        assert sorted(map(str, theirs.cand_cat[name].values)) == \
            sorted(map(str, ours.cand_cat[name].values))
    for mine, spark in ((ours.user_num, theirs.user_num), (ours.cand_num, theirs.cand_num)):
        for name, stats in mine.items():
            assert spark[name].mean == pytest.approx(stats.mean, rel=1e-5, abs=1e-6)
            assert spark[name].std == pytest.approx(stats.std, rel=1e-5)
    loader = RequestLoader(split_files(spark_data, "test"), theirs, batch_size=128)
    batches = list(loader)
    assert sum(len(b) for b in batches) == pq.ParquetFile(sim / "test.parquet").metadata.num_rows
    original = pq.read_table(sim / "test.parquet", columns=["request_id", "feedback_view"])
    shown = dict(zip(original.column("request_id").to_pylist(),
                     pc.list_value_length(original.column("feedback_view")).to_pylist(),
                     strict=True))
    for batch in batches:
        assert batch.exposed_mask.sum(1).tolist() == [shown[r] for r in batch.request_id]


def test_a_model_trains_and_evaluates_on_spark_folders(spark_data, tmp_path):
    config = load_overrides(RunConfig(), None, TINY)
    info = train_run(spark_data, tmp_path / "run", model="dnn", config=config, progress=False)
    assert info["data_fingerprint"]["train"]["files"] == 3
    assert info["data_fingerprint"]["valid"]["files"] == 2
    assert np.isfinite(info["phases"]["model"]["best_valid_loss"])     # on the valid folder
    report = evaluate_run(tmp_path / "run", spark_data, batch_size=256)
    assert report["requests"] == sum(pq.ParquetFile(p).metadata.num_rows
                                     for p in split_files(spark_data, "test"))
    assert np.isfinite(report["metrics"]["utility"])
    assert np.isfinite(report["metrics"]["oracle_utility"])


def test_a_folder_without_key_or_sidecar_says_what_to_add(sim, tmp_path, capsys):
    data = tmp_path / "data"
    write_like_spark(pq.read_table(sim / "valid.parquet"), data / "train", parts=2,
                     timestamps="micros", sidecar=None)
    assert main(["validate", str(data / "train")]) == 1
    err = capsys.readouterr().err
    assert "no 'nar4rec' key" in err and SIDECAR_FILE in err and "part-00000" in err
    with pytest.raises(DataError, match=f"no 'nar4rec' key and no {SIDECAR_FILE} sidecar"):
        train_run(data, tmp_path / "run", model="dnn",
                  config=load_overrides(RunConfig(), None, TINY), progress=False)
    assert not (tmp_path / "run").exists()


def test_sidecar_problems_name_the_sidecar(sim, tmp_path):
    meta = footer_json(sim / "valid.parquet")
    table = pq.read_table(sim / "valid.parquet").slice(0, 50)
    part = write_like_spark(table, tmp_path / "broken", parts=1, timestamps="micros",
                            sidecar=None)[0]
    sidecar = tmp_path / "broken" / SIDECAR_FILE
    sidecar.write_text("{behaviours: [")
    with pytest.raises(DataError, match=f"the sidecar {sidecar} is not valid JSON"):
        read_spec(part)
    kept = meta["behaviours"][:2]
    sidecar.write_text(json.dumps({**meta, "behaviours": kept, "utility_weights": {
        b: meta["utility_weights"][b] for b in kept}}))
    problem = check_file(part).problems[0]
    assert problem.field == "feedback_complete_view"
    assert f"not listed in the sidecar {sidecar}'s behaviours" in problem.message

    # A file with its own key keeps it; a sidecar beside it must then agree on what counts.
    own = tmp_path / "broken" / "written-by-nar4rec.parquet"
    pq.write_table(table, own)
    with pytest.raises(DataError, match="disagree on behaviours") as error:
        read_spec(own)
    assert error.value.field == "nar4rec"
    sidecar.write_text(json.dumps({**meta, "source": "a Spark job"}))
    assert read_spec(own).extra["source"] == meta["source"]          # the file's own key
    assert read_spec(part).extra["source"] == "a Spark job"


def test_a_whole_log_written_by_spark_splits_by_time(sim, tmp_path):
    """One Spark folder of the whole log (its format in the sidecar) -> `nar4rec split` -> a
    data directory whose files carry the footer key and validate."""
    whole = pa.concat_tables([pq.read_table(sim / f"{s}.parquet") for s in
                              ("train", "valid", "test")])
    write_like_spark(whole, tmp_path / "log", parts=3, timestamps="micros",
                     sidecar=footer_json(sim / "train.parquet"))
    assert main(["split", str(tmp_path / "log"), "--out", str(tmp_path / "data")]) == 0
    rows = 0
    for split in ("train", "valid", "test"):
        path = tmp_path / "data" / f"{split}.parquet"
        assert footer_json(path)["behaviours"] == footer_json(sim / "train.parquet")["behaviours"]
        assert check_file(path).ok
        rows += pq.read_metadata(path).num_rows
    assert rows == whole.num_rows
