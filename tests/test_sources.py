"""Native-layout builders: files this test writes in each source's layout, then the shared
real samples (../shared/data/native) when they are beside the checkout."""

import csv
import gzip
import os
import shutil
import tempfile

import numpy as np
import pydicom
import pytest
from PIL import Image

import dicom_files
import shared_data
from configs import common, detl
from xrayjax.data import pipeline, sources, tasks
from xrayjax.data.sources import covidx, decode, ieee8023_covid, native, nih_cxr14, rsna_pneumonia

NATIVE = shared_data.path("native")
needs_native = shared_data.needs(NATIVE)


def _image(seed, shape=(80, 64)):
  """A smooth random picture (distinct perceptual hashes for distinct seeds)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (6, 5)).astype(np.uint8)
  big = np.asarray(Image.fromarray(small).resize(shape[::-1], Image.BICUBIC), np.float64)
  return np.clip(big + rng.normal(0, 4, shape), 0, 255).astype(np.uint8)


def _build(tmp_path, source, root, size=32, **options):
  c = common.data_config(source)
  c.tfds_dir = str(tmp_path / "tfds")
  c[source].update(root=str(root), image_size=size, **options)
  b = sources.builder(c, source)
  examples = {ex["image_id"].decode(): ex for ex in b.as_dataset(split="train")
              .as_numpy_iterator()}
  return b, sources.build_report(b), examples


def _reasons(report):
  return {os.path.basename(r["path"]): r["reason"] for r in report["skipped_rows"]}


def test_nih_layout_labels_boxes_and_bad_files(tmp_path):
  root = tmp_path / "nih"
  (root / "images_001" / "images").mkdir(parents=True)  # the Kaggle layout
  images = root / "images_001" / "images"
  Image.fromarray(_image(0)).save(images / "00000001_000.png")
  Image.fromarray((_image(1).astype(np.uint16) * 250)).save(images / "00000002_000.png")  # 16-bit
  Image.fromarray(_image(2)).convert("RGBA").save(images / "00000003_000.png")
  Image.fromarray(np.full((80, 64), 9, np.uint8)).save(images / "00000004_000.png")  # blank
  (images / "00000005_000.png").write_bytes((images / "00000001_000.png").read_bytes()[:200])
  header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
            "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
  lines = ["00000001_000.png,No Finding,0,1,50,M,PA,64,80,0.1,0.1",
           "00000002_000.png,Atelectasis|Effusion,0,2,50,F,AP,64,80,0.1,0.1",
           "00000003_000.png,Pneumonia|Mass,0,3,50,F,PA,64,80,0.1,0.1",
           "00000004_000.png,Mass,0,4,50,F,PA,64,80,0.1,0.1",
           "00000005_000.png,Nodule,0,5,50,F,PA,64,80,0.1,0.1",
           "00000006_000.png,Nodule,0,6,50,F,PA,64,80,0.1,0.1"]
  with gzip.open(root / "Data_Entry_2017_v2020.csv.gz", "wt") as f:
    f.write(header + "\n".join(lines) + "\n")
  (root / "BBox_List_2017.csv").write_text(
      "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000002_000.png,Atelectasis,16,8,32,40\n")
  b, report, ex = _build(tmp_path, "nih_cxr14", root)
  assert sorted(ex) == ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
  reasons = _reasons(report)
  assert reasons["00000004_000.png"].startswith("blank image")
  assert reasons["00000005_000.png"].startswith("unreadable image")
  assert reasons["00000006_000.png"].startswith("missing file")
  assert report["skipped_by_reason"] == {"blank image": 1, "unreadable image": 1,
                                         "missing file": 1}
  e = ex["00000002_000.png"]
  assert e["patient_id"].decode() == "nih-00000002" and e["view"].decode() == "AP"
  assert e["label"].decode() == "Atelectasis|Effusion"
  assert [tasks.FINDINGS[i] for i in np.flatnonzero(e["findings"])] == ["Atelectasis", "Effusion"]
  np.testing.assert_allclose(e["boxes"]["bbox"][0], [8 / 80, 16 / 64, 48 / 80, 48 / 64],
                             rtol=1e-6)
  assert len(ex["00000001_000.png"]["boxes"]["bbox"]) == 0
  assert all(x["image"].shape == (32, 32, 1) for x in ex.values())
  assert len(e["phash"].decode()) == 64 and len(e["file_sha1"].decode()) == 40
  meta = pipeline.read_metadata(b)
  labels, _ = tasks.get("data_a").assign(meta)
  assert labels.tolist() == [0, 1, -1]  # No Finding, Atelectasis|Effusion, Pneumonia|Mass
  # The box becomes the lesion mask that Grad-CAM's localisation is scored against.
  m = pipeline.masks([b], np.zeros(3, int), meta["image_id"], 16)
  assert m["has_lesion"].tolist() == [False, True, False] and not m["has_lung"].any()
  assert m["lesion"][1, 1:10, 4:12].all() and m["lesion"][1].sum() == 9 * 8  # y .1-.6, x .25-.75


def test_rsna_dicoms_monochrome1_and_2_windows_and_compression(tmp_path):
  root = tmp_path / "rsna"
  images = root / "stage_2_train_images"
  images.mkdir(parents=True)
  base = (_image(3).astype(np.uint16) * 16)  # 12-bit
  dicom_files.write(images / "p-mono2.dcm", base, "MONOCHROME2", bits=12)
  dicom_files.write(images / "p-mono1.dcm", 4095 - base, "MONOCHROME1", bits=12, view="AP")
  dicom_files.write(images / "p-j2k.dcm", base, "MONOCHROME2", bits=12, syntax="j2k")
  dicom_files.write(images / "p-jpeg.dcm", _image(3), "MONOCHROME2", bits=8, syntax="jpeg")
  # A window over the lower half of the range: everything above it saturates.
  dicom_files.write(images / "p-window.dcm", base, "MONOCHROME2", bits=12, window=(1024, 2048))
  whole = (images / "p-mono2.dcm").read_bytes()
  (images / "p-broken.dcm").write_bytes(whole[:400])  # cut in the header
  (images / "p-cut.dcm").write_bytes(whole[:-3000])  # cut in the pixel data
  ids = ["p-mono2", "p-mono1", "p-j2k", "p-jpeg", "p-window", "p-broken", "p-cut", "p-absent"]
  rows = ["patientId,x,y,width,height,Target"]
  rows += [f"{p},,,,,0" for p in ids[1:]]
  rows += ["p-mono2,10,20,30,40,1", "p-mono2,40,20,10,10,1"]
  (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
  (root / "stage_2_detailed_class_info.csv").write_text(
      "patientId,class\n" + "\n".join(f"{p},{'Lung Opacity' if p == 'p-mono2' else 'Normal'}"
                                      for p in ids) + "\n")
  b, report, ex = _build(tmp_path, "rsna_pneumonia", root)
  reasons = _reasons(report)
  assert reasons["p-broken.dcm"].startswith("unreadable DICOM")
  assert reasons["p-cut.dcm"].startswith("unreadable DICOM")
  assert reasons["p-absent.dcm"].startswith("missing file")
  img = {k: v["image"][..., 0].astype(int) for k, v in ex.items()}
  # MONOCHROME1 is inverted on decode, so it reads as the MONOCHROME2 picture.
  np.testing.assert_allclose(img["p-mono1"], img["p-mono2"], atol=1)
  np.testing.assert_array_equal(img["p-j2k"], img["p-mono2"])  # lossless
  assert np.corrcoef(img["p-jpeg"].ravel(), img["p-mono2"].ravel())[0, 1] > 0.98
  assert (img["p-window"] == 255).mean() > (img["p-mono2"] == 255).mean() + 0.2  # VOI window
  assert ex["p-mono1"]["view"].decode() == "AP"  # from the DICOM header
  e = ex["p-mono2"]
  assert e["label"].decode() == "Lung Opacity" and e["patient_id"].decode() == "rsna-p-mono2"
  assert len(e["boxes"]["bbox"]) == 2
  np.testing.assert_allclose(e["boxes"]["bbox"][0], [20 / 80, 10 / 64, 60 / 80, 40 / 64])
  meta = pipeline.read_metadata(b)
  labels = tasks.get("three_class").labels(meta)
  assert dict(zip(meta["image_id"], labels))["p-mono2"] == 1  # Target 1 -> pneumonia
  assert dict(zip(meta["image_id"], labels))["p-j2k"] == 0  # detailed class Normal -> normal


def test_ieee8023_both_finding_schemas_views_and_modalities(tmp_path):
  root = tmp_path / "ieee"
  (root / "images").mkdir(parents=True)
  rows = [("1", "COVID-19", "PA", "X-ray", "a.png"),
          ("1", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "b.jpg"),
          ("2", "Pneumonia/Fungal/Pneumocystis", "AP", "X-ray", "c.png"),
          ("3", "SARS", "PA", "X-ray", "d.png"),
          ("4", "No Finding", "PA", "X-ray", "e.png"),
          ("5", "Pneumonia/Bacterial/Klebsiella", "PA", "X-ray", "f.png"),
          ("6", "COVID-19", "L", "X-ray", "g.png"),
          ("7", "COVID-19", "Axial", "CT", "h.png"),
          ("8", "COVID-19", "PA", "X-ray", "absent.png")]
  for k, (*_, name) in enumerate(rows[:7]):
    Image.fromarray(_image(10 + k)).convert("RGB").save(root / "images" / name)
  with open(root / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["patientid", "offset", "finding", "view", "modality", "folder", "filename"])
    for pid, finding, view, modality, name in rows:
      w.writerow([pid, "0", finding, view, modality, "images", name])
  b, report, ex = _build(tmp_path, "ieee8023_covid", root)
  assert sorted(ex) == ["a.png", "b.jpg", "c.png", "d.png", "e.png", "f.png"]
  reasons = _reasons(report)
  assert "not frontal" in reasons["g.png"] and "modality CT" in reasons["h.png"]
  assert reasons["absent.png"].startswith("missing file")
  meta = pipeline.read_metadata(b)
  three = dict(zip(meta["image_id"], tasks.get("three_class").labels(meta)))
  # The authors' mapping: COVID-19 -> covid; Pneumocystis, SARS -> pneumonia; others out.
  assert three == {"a.png": 2, "b.jpg": 2, "c.png": 1, "d.png": 1, "e.png": 0, "f.png": -1}
  four = dict(zip(meta["image_id"], tasks.get("data_b").labels(meta)))
  assert four["b.jpg"] == 3 and four["f.png"] == 1 and four["e.png"] == 0
  assert set(meta["patient_id"]) >= {"ieee-1", "ieee-2"}
  _, report_all, ex_all = _build(tmp_path, "ieee8023_covid", root, frontal_only=False)
  assert "g.png" in ex_all


def test_covidx_label_files_and_patient_ids_shared_with_their_collections(tmp_path):
  root = tmp_path / "covidx"
  (root / "train").mkdir(parents=True)
  for k, name in enumerate(("c1.png", "n1.png", "r1.png")):
    Image.fromarray(_image(20 + k)).save(root / "train" / name)
  (root / "train_COVIDx9A.txt").write_text(
      "7 c1.png COVID-19 cohen\n0a1b n1.png normal rsna\nx r1.png pneumonia sirm\n"
      "9 gone.png COVID-19 fig1\n")
  b, report, ex = _build(tmp_path, "covidx", root)
  assert sorted(ex) == ["train/c1.png", "train/n1.png", "train/r1.png"]
  assert _reasons(report)["gone.png"].startswith("missing file")
  assert ex["train/c1.png"]["patient_id"].decode() == "ieee-7"
  assert ex["train/n1.png"]["patient_id"].decode() == "rsna-0a1b"
  assert ex["train/r1.png"]["source"].decode() == "covidx/sirm"
  meta = pipeline.read_metadata(b)
  assert tasks.get("three_class").labels(meta).tolist() == [2, 0, 1]
  (root / "bad.txt").write_text("only two\n")
  with pytest.raises(native.LayoutError, match="bad.txt:1: expected `patientid filename"):
    covidx.read_rows(str(root), covidx.label_files(str(root)))


@pytest.mark.parametrize("source,expected", [
    ("nih_cxr14", "Data_Entry_2017"), ("rsna_pneumonia", "stage_2_train_labels.csv"),
    ("ieee8023_covid", "metadata.csv"), ("covidx", "label files")])
def test_a_directory_in_another_layout_is_refused_with_what_was_expected(tmp_path, source,
                                                                         expected):
  (tmp_path / "something_else.txt.gz").write_text("x")
  c = common.data_config(source)
  c[source].root = str(tmp_path)
  with pytest.raises(native.LayoutError, match=expected) as e:
    sources.builder(c, source)
  assert "something_else.txt.gz" in str(e.value)  # what was found
  c[source].root = None
  os.environ.pop(native.env_var(source), None)
  with pytest.raises(ValueError, match=native.env_var(source)):
    sources.builder(c, source)


def _five_image_nih(tmp_path):
  """A NIH-layout folder of five "No Finding" images: (root, file names in key order)."""
  root = tmp_path / "nih"
  (root / "images").mkdir(parents=True)
  names = [f"0000000{k}_000.png" for k in range(1, 6)]
  for k, n in enumerate(names):
    Image.fromarray(_image(30 + k)).save(root / "images" / n)
  (root / "Data_Entry_2017.csv").write_text(
      "Image Index,Finding Labels,Follow-up #,Patient ID,View Position\n"
      + "".join(f"{n},No Finding,0,{k},PA\n" for k, n in enumerate(names)))
  return root, names


def test_an_interrupted_build_resumes_from_its_cache(tmp_path, monkeypatch):
  root, names = _five_image_nih(tmp_path)
  monkeypatch.setattr(native, "CHUNK", 2)
  calls = []
  real = decode.read_image

  def dying(path):
    calls.append(os.path.basename(path))
    if len(calls) == 4:
      raise KeyboardInterrupt  # the build is killed in its second chunk
    return real(path)

  monkeypatch.setattr(decode, "read_image", dying)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, "nih_cxr14", root)
  assert calls[:2] == names[:2]
  calls.clear()
  monkeypatch.setattr(decode, "read_image", lambda p: (calls.append(os.path.basename(p)),
                                                        real(p))[1])
  b, report, ex = _build(tmp_path, "nih_cxr14", root)
  assert calls == names[2:]  # the first chunk came from the cache
  assert sorted(ex) == names and report["built"] == 5
  assert not os.path.exists(b.cache_dir())  # removed once the build completed


def test_parallel_build_processes_decode_their_share_of_chunks_then_one_builds(tmp_path,
                                                                              monkeypatch):
  """A multi-process build: each process decodes the chunks k with k % processes == its
  index into the resume cache (before a barrier), and the build then decodes nothing."""
  root, names = _five_image_nih(tmp_path)
  monkeypatch.setattr(native, "CHUNK", 2)  # chunks: names[0:2], names[2:4], names[4:]
  events = []
  real = decode.read_image
  monkeypatch.setattr(decode, "read_image", lambda p: (events.append(os.path.basename(p)),
                                                        real(p))[1])
  built = []

  def barrier(name):  # process 0 builds while process 1 waits at "build"
    events.append(name)
    built.append(name.startswith("build"))

  monkeypatch.setattr(sources.sharding, "barrier", barrier)
  monkeypatch.setattr(sources.jax, "process_count", lambda: 2)
  monkeypatch.setattr(sources.jax, "process_index", lambda: 1)
  monkeypatch.setattr(native.NativeBuilder, "is_prepared", lambda self: any(built))
  c = common.data_config("nih_cxr14")
  c.tfds_dir = str(tmp_path / "tfds")
  c.nih_cxr14.update(root=str(root), image_size=32)
  # Process 1 of 2 decodes its chunk, waits for the others' chunks, then for process 0's build.
  sources.builder(c, "nih_cxr14")
  assert events == names[2:4] + ["decode nih_cxr14", "build nih_cxr14"]
  monkeypatch.undo()
  cls, cfg = sources._config("nih_cxr14", c)
  monkeypatch.setattr(native, "CHUNK", 2)
  monkeypatch.setattr(decode, "read_image", lambda p: (events.append(os.path.basename(p)),
                                                        real(p))[1])
  events.clear()
  b = cls(config=cfg, data_dir=c.tfds_dir)
  native.remove_cache(b)  # both processes from the start, on one cache
  b.decode_share(1, 2)
  assert events == names[2:4]
  events.clear()
  b.decode_share(0, 2)
  assert events == names[:2] + names[4:]
  events.clear()
  b.decode_share(0, 2)  # again (a resumed process): its chunks are in the cache
  assert events == []
  b, report, ex = _build(tmp_path, "nih_cxr14", root)
  assert events == [] and sorted(ex) == names and report["built"] == 5  # all from the cache


def test_the_papers_data_nih_for_data_a_and_nih_plus_ieee8023_for_data_b(tmp_path):
  from xrayjax import experiment
  from xrayjax.evaluate import score
  nih, ieee = tmp_path / "nih", tmp_path / "ieee"
  (nih / "images").mkdir(parents=True)
  (ieee / "images").mkdir(parents=True)
  labels = (["No Finding"] * 14 + ["Effusion", "Mass|Nodule", "Hernia", "Edema"] * 3
            + [f for f in tasks.DETL_OTHER for _ in range(2)] + ["Pneumonia"] * 4
            + ["Pneumonia|Infiltration"] * 2)
  entry = ["Image Index,Finding Labels,Follow-up #,Patient ID,View Position"]
  for k, label in enumerate(labels):
    name = f"{k + 1:08d}_000.png"
    Image.fromarray(_image(100 + k)).save(nih / "images" / name)
    entry.append(f"{name},{label},0,{k + 1},PA")
  (nih / "Data_Entry_2017.csv").write_text("\n".join(entry) + "\n")
  meta_rows = ["patientid,finding,view,modality,folder,filename"]
  for k in range(8):
    name = f"covid{k}.png"
    Image.fromarray(_image(300 + k)).save(ieee / "images" / name)
    meta_rows.append(f"{k},{'No Finding' if k >= 6 else 'Pneumonia/Viral/COVID-19'},PA,X-ray,"
                     f"images,{name}")
  (ieee / "metadata.csv").write_text("\n".join(meta_rows) + "\n")
  c = detl.get_config("data=nih,runlocal")
  c.data.tfds_dir = str(tmp_path / "tfds")
  c.data.nih_cxr14.update(root=str(nih), image_size=32)
  c.data.ieee8023_covid.update(root=str(ieee), image_size=32)
  c.data_b.update(images_per_class={"normal": 4, "pneumonia": 0, "other_disease": 6, "covid": 0},
                  val_fraction=0.5)
  c.stage_a.batch_size = c.stage_b.batch_size = 2  # a plan of a few images (none trained)
  cohort, p = experiment.prepare(c)
  meta = cohort.meta
  assert set(cohort.build_reports()) == {"nih_cxr14", "ieee8023_covid"}
  summary = score.describe(cohort, p)
  assert summary["partitions"]["data_b"] == {"normal": 4, "pneumonia": 6, "other_disease": 6,
                                             "covid": 6}
  from_ieee = summary["evaluated_label_by_source"]["ieee8023_covid"]
  assert from_ieee["covid"] == 6 and from_ieee["pneumonia"] == from_ieee["other_disease"] == 0
  data_b = p.partitions["data_b"]
  b_other = data_b[p.labels[data_b] == 2]
  assert sorted(meta["label"][b_other]) == sorted(tasks.DETL_OTHER)  # one of each of the six
  a = p.stage("stage_a").rows()
  assert set(meta["source"][a]) == {"nih_cxr14"}  # ieee8023's normals stay out of Data-A
  assert summary["test_patients_seen_in_training"] == 0
  assert not any("Pneumonia" in l for l in meta["label"][a])
  n_a = len(a)
  # NIH's normals not in Data-B, 12 other findings, the 6 unused single-finding images.
  assert n_a == 14 - summary["evaluated_label_by_source"]["nih_cxr14"]["normal"] + 12 + 6

# --- the shared real samples --------------------------------------------------------------------


@needs_native
def test_shared_nih_sample_and_task_counts_on_all_112120_rows(tmp_path):
  root = os.path.join(NATIVE, "nih_cxr14")
  rows, _ = nih_cxr14.read_rows(root)
  assert len(rows) == 112_120
  meta = {"label": np.array([r.label for r in rows], object),
          "source": np.array([r.source for r in rows], object),
          "findings": np.stack([native.findings_vector(r.findings) for r in rows])}
  # The label rules, counted independently from the raw "Finding Labels" strings.
  sets = [set(r.label.split("|")) for r in rows]
  normal = sum(s == {"No Finding"} for s in sets)
  disease = sum("No Finding" not in s and "Pneumonia" not in s for s in sets)
  pneumonia = sum("Pneumonia" in s for s in sets)
  single = {f: sum(s == {f} for s in sets) for f in tasks.DETL_OTHER}
  a = np.bincount(tasks.get("data_a").labels(meta) + 1, minlength=3)
  assert a.tolist() == [112_120 - normal - disease, normal, disease]
  b_labels, strata = tasks.get("data_b").assign(meta)
  assert np.sum(b_labels == 0) == normal and np.sum(b_labels == 1) == pneumonia
  assert {f: int(np.sum(strata == f)) for f in tasks.DETL_OTHER} == single
  assert (normal, disease, pneumonia) == (60_361, 50_328, 1_431)  # the 2020 labels
  assert np.sum(b_labels == 3) == 0  # NIH has no COVID-19
  # Building reads the 4 images present and lists the 112,116 rows whose file is absent.
  b, report, ex = _build(tmp_path, "nih_cxr14", root)
  assert report["built"] == len(os.listdir(os.path.join(root, "images"))) == len(ex)
  assert report["skipped_by_reason"] == {"missing file": 112_120 - len(ex)}
  # Every box of BBox_List for the images present, and no other (one of the four has one).
  with gzip.open(os.path.join(root, "BBox_List_2017.csv.gz"), "rt", newline="") as f:
    boxed = [r["Image Index"] for r in csv.DictReader(f) if r["Image Index"] in ex]
  assert len(boxed) == 1
  assert sum(len(e["boxes"]["bbox"]) for e in ex.values()) == len(boxed)


@needs_native
def test_shared_rsna_labels_and_the_standin_dicom(tmp_path):
  src = os.path.join(NATIVE, "rsna_pneumonia")
  rows, _ = rsna_pneumonia.read_rows(src)
  assert len(rows) == 26_684 and sum(len(r.boxes) for r in rows) == 9_555
  # The stand-in DICOM (8-bit JPEG baseline, MONOCHROME2) under a real patientId.
  root = tmp_path / "rsna"
  (root / "stage_2_train_images").mkdir(parents=True)
  shutil.copy(os.path.join(src, "stage_2_train_labels.csv"), root)
  standin = os.listdir(os.path.join(src, "stage_2_train_images"))[0]
  target = next(r for r in rows if r.boxes)
  os.symlink(os.path.join(src, "stage_2_train_images", standin),
             root / "stage_2_train_images" / f"{target.key}.dcm")
  b, report, ex = _build(tmp_path, "rsna_pneumonia", root, size=64)
  assert list(ex) == [target.key] and report["skipped"] == 26_683
  e = ex[target.key]
  assert e["label"].decode() == "Target 1" and len(e["boxes"]["bbox"]) == len(target.boxes)
  assert 40 < e["image"].mean() < 215 and e["image"].std() > 20


@needs_native
@pytest.mark.parametrize("source,folder,count", [("ieee8023_covid", "ieee8023", None),
                                                 ("covidx", "covidx", 5)])
def test_shared_ieee8023_and_covidx_samples_build(tmp_path, source, folder, count):
  b, report, ex = _build(tmp_path, source, os.path.join(NATIVE, folder))
  assert len(ex) > 0 and report["built"] == len(ex)
  if count:
    assert len(ex) == count and report["skipped"] == 0
  meta = pipeline.read_metadata(b)
  assert (tasks.get("three_class").labels(meta) >= 0).all()


def test_dicoms_from_pydicom_data_decode_alike():
  """A real chest DICOM (MONOCHROME1, 15-bit) uncompressed and JPEG 2000 lossless."""
  from pydicom.data.data_manager import external_data_sources
  store = external_data_sources().get("pydicom-data")  # local files only; never downloads
  if store is None:
    pytest.skip("pydicom-data is not installed (pip install pydicom-data)")
  files = {n: os.path.join(store.data_path, n) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")}
  if not all(os.path.isfile(f) for f in files.values()):
    pytest.skip(f"pydicom-data has no RG1 files in {store.data_path}")
  unc, _, _ = decode.read_image(files["RG1_UNCR.dcm"])
  j2k, _, _ = decode.read_image(files["RG1_J2KR.dcm"])
  np.testing.assert_array_equal(unc, j2k)
  raw = pydicom.dcmread(files["RG1_UNCR.dcm"]).pixel_array
  assert np.corrcoef(unc.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.9  # MONOCHROME1 inverted


def test_native_builds_are_keyed_by_their_listing_digest(tmp_path):
  """A build is named by its directory's file listing (paths, sizes, modification times):
  a file added or changed gives a new build with it, not the old build; the same tree gives
  the same build. A run directory recorded before names differed by listing compares the
  files themselves, so only real changes refuse it."""
  from xrayjax import rundir
  root = tmp_path / "nih"
  (root / "images").mkdir(parents=True)
  names = [f"0000000{k}_000.png" for k in range(1, 4)]
  for k, n in enumerate(names):
    Image.fromarray(_image(30 + k)).save(root / "images" / n)
  entries = lambda ns: ("Image Index,Finding Labels,Follow-up #,Patient ID,View Position\n"
                        + "".join(f"{n},No Finding,0,{k},PA\n" for k, n in enumerate(ns)))
  (root / "Data_Entry_2017.csv").write_text(entries(names))
  first, _, ex = _build(tmp_path, "nih_cxr14", root)
  assert sorted(ex) == names
  assert _build(tmp_path, "nih_cxr14", root)[0].info.full_name == first.info.full_name
  names.append("00000004_000.png")  # a file added, and listed
  Image.fromarray(_image(40)).save(root / "images" / names[-1])
  (root / "Data_Entry_2017.csv").write_text(entries(names))
  second, _, ex = _build(tmp_path, "nih_cxr14", root)
  assert second.info.full_name != first.info.full_name and sorted(ex) == names
  os.utime(root / "images" / names[0], (1, 1))  # a file changed in place
  assert _build(tmp_path, "nih_cxr14", root)[0].info.full_name != second.info.full_name
  # The run-directory check: a renamed build over the same files is not a change; files are.
  files_ = native.stats(str(root), native.walk(str(root)))
  old = {"nih_cxr14": {"builder": "nih_cxr14/s32_0123456789/1.0.0", "version": "1.0.0",
                       "root": str(root), "files": files_}}
  new = {"nih_cxr14": {**old["nih_cxr14"], "builder": second.info.full_name}}
  assert rundir._data_changes(old, new) == []
  new["nih_cxr14"]["files"] = {**files_, "images/extra.png": [1, 1]}
  assert any("1 file(s) added" in c for c in rundir._data_changes(old, new))


def test_builders_of_data_not_yet_built_leave_no_temporary_directory(tmp_path, monkeypatch):
  # TFDS looks every data set not yet built up on its bucket, from a temporary directory it
  # never removes: ours are never there (schema.dataset_info).
  private = tmp_path / "tmp"
  private.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(private))
  (tmp_path / "manifest.csv").write_text("path,label4,patient_id,source\n")
  monkeypatch.setenv(sources.MANIFEST_ENV, str(tmp_path / "manifest.csv"))
  for source in ("synthetic", "manifest"):  # the native sources share manifest's _info
    c = common.data_config(source)
    c.tfds_dir = str(tmp_path / "tfds")
    cls, cfg = sources._config(source, c)  # pylint: disable=protected-access
    b = cls(config=cfg.name if cfg.name in cls.builder_configs else cfg, data_dir=c.tfds_dir)
    assert not b.is_prepared() and b.info.features["image"].shape[-1] == 1, source
  assert not list(private.iterdir())
